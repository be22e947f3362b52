//! Dataset reading (pairs, images, IUV, textures, face embeddings) and training-time masks.

pub mod face_mask;
pub mod train_set;
