//! `mcld edit`: `infer` with another person's identity and/or garments swapped in.

use std::path::PathBuf;

use clap::Args;

use super::infer::InferArgs;
use crate::edit::EditRequest;
use crate::Result;

#[derive(Debug, Args)]
#[command(
    after_help = "Files: OUT (the image), OUT_edit.json (what came from whom, and how \
much of each region the donor's photo covered), the texture the networks saw (--save-texture, \
default OUT_texture.png when garments are swapped), OUT_donorN_texture.png per donor photo, \
OUT_source_texture.png and OUT_source_iuv.png when the source's texture is computed. Where \
regions overlap (outfit and upper) the narrower one wins. A texel the donor's photo never \
showed keeps the source's."
)]
#[command(mut_arg("save_texture", |a| a.help(
    "Where to write the texture map the networks see (the composed one; default \
     OUT_texture.png when garments are swapped, none otherwise)"
)))]
pub struct EditArgs {
    #[command(flatten)]
    pub infer: InferArgs,
    /// Identity of another person: the face embedding of this photo (antelopev2 in
    /// --pretrained_dir) replaces the source's.
    #[arg(long = "face-from", visible_alias = "face_from", conflicts_with_all = ["face", "face_emb"])]
    pub face_from: Option<PathBuf>,
    /// Identity of another person as a precomputed (512,) float32 .npy ArcFace embedding.
    #[arg(long = "face-emb", visible_alias = "face_emb", conflicts_with = "face")]
    pub face_emb: Option<PathBuf>,
    /// REGION=PHOTO (repeatable): that region of the texture map comes from the person in PHOTO
    /// (its texture map computed with DensePose). Regions: head, upper, lower, hands, feet,
    /// outfit (= upper + lower).
    #[arg(long = "garment", value_name = "REGION=PHOTO")]
    pub garment: Vec<String>,
    /// REGION=TEXTURE.png (repeatable): as --garment, from a 512x512 texture map.
    #[arg(
        long = "garment-texture",
        visible_alias = "garment_texture",
        value_name = "REGION=TEXTURE.png"
    )]
    pub garment_texture: Vec<String>,
    /// Side-by-side PNG: source | donor(s) | composed texture | target pose | result.
    #[arg(long)]
    pub panel: Option<PathBuf>,
    /// CLIP's first input (the photo of the person): `auto` shows it the donor's photo when
    /// the whole outfit comes from one donor photo and the source's otherwise; `source` or
    /// `donor` force it.
    #[arg(long = "source-clip", visible_alias = "source_clip", default_value = "auto",
          value_parser = ["auto", "source", "donor"])]
    pub source_clip: String,
}

impl EditArgs {
    pub fn request(&self) -> Result<EditRequest> {
        Ok(EditRequest {
            infer: self.infer.request()?,
            face_from: self.face_from.clone(),
            face_emb: self.face_emb.clone(),
            garment: self.garment.clone(),
            garment_texture: self.garment_texture.clone(),
            panel: self.panel.clone(),
            source_clip: self.source_clip.clone(),
        })
    }
}

pub fn run(a: &EditArgs) -> Result<()> {
    crate::edit::run(&a.request()?)
}
