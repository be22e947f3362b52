//! Telea inpainting (OpenCV 4.8 INPAINT_TELEA), used by the texture maps.
