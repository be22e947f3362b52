//! The dataset: its layout (folders, file naming, listing), pairs, `.npy` I/O, training pairs
//! and training-time masks. Read by `prepare`, the pipeline, `test` and training alike.

pub mod face_mask;
pub mod layout;
pub mod npy;
pub mod pairs;
pub mod train_set;

pub use layout::{
    derived_path, list_photos, parse_face_embedding, read_face_embedding, read_rgb, DatasetLayout,
    Part,
};
pub use pairs::{load_pair, read_pairs, Pair, PairInputs};
