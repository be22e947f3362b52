//! `mcld edit`: identity and garment swaps between people on the one inference pipeline, with
//! no new network. MCLD splits a person into a UV texture map (appearance per body part) and a
//! face embedding (identity); an edit replaces either before the networks run, then the pair
//! goes through exactly `mcld infer`'s path.
//!
//! What each network input sees in an edit:
//! - the reference UNet's latents and CLIP's texture input: the composed texture map;
//! - the face projector: the donor's embedding (`--face-from` / `--face-emb`), else the
//!   source's, as `infer` takes it;
//! - CLIP's photo input (the first CLIP token, seen by the reference UNet, the down blocks and
//!   the mid block): the source photo, except when the whole outfit (every `upper` and `lower`
//!   part) comes from one donor photo, where it is that donor photo. In training that token
//!   always shows the same clothes as the texture; after an outfit swap the source photo would
//!   pull two of the three appearance cues back to the old clothes. The donor photo also shows
//!   the donor's hair and face, so identity rests on the face embedding and the head texels,
//!   which stay the source's. `--source-clip source|donor` overrides the choice.
//!
//! An identity swap alone changes only the face embedding: it equals `infer` given the donor's
//! embedding. Add `--garment head=PHOTO` to take the head's texels (hair, face skin) too.

pub mod compose;
pub mod run;

pub use run::{run, EditRequest};

use image::RgbImage;

use crate::data::PairInputs;
use crate::Result;
use compose::{compose_region, Coverage, Region, TexelParts};

/// What an edit changes in the pair `infer` would run.
#[derive(Debug, Clone, Default)]
pub struct EditPlan {
    /// The identity to use instead of the source's.
    pub face: Option<Vec<f32>>,
    /// Regions and the donor texture maps they come from, applied in order (later ones win
    /// where regions overlap).
    pub garments: Vec<(Region, RgbImage)>,
    /// What CLIP's photo input sees instead of the source photo.
    pub clip_source: Option<RgbImage>,
}

/// The edited pair and, per garment, how much of its region the donor covered. An empty plan
/// returns the pair unchanged.
pub fn apply_edit(
    input: &PairInputs,
    plan: &EditPlan,
    parts: &TexelParts,
) -> Result<(PairInputs, Vec<Coverage>)> {
    let mut out = input.clone();
    let mut coverage = Vec::with_capacity(plan.garments.len());
    for (region, donor) in &plan.garments {
        let (tex, cov) = compose_region(&out.texture, donor, *region, parts)?;
        out.texture = tex;
        coverage.push(cov);
    }
    if let Some(face) = &plan.face {
        out.face = face.clone();
        out.face_missing = false;
    }
    if let Some(photo) = &plan.clip_source {
        out.source = photo.clone();
    }
    Ok((out, coverage))
}
