//! DensePose R-CNN (detectron2) in candle: photo -> IUV image.
