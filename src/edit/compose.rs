//! Region swaps in the 512x512 UV texture map (SPEC §2): every texel belongs to one DensePose
//! part (the Atlas2Normal table's `src_part`), so "the upper body of person B on person A" is a
//! per-texel choice between two texture maps, with no network involved.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use image::RgbImage;

use crate::person::texture::{TextureAssets, NORMAL, PARTS};
use crate::{Error, Result};

/// A body region: a fixed set of DensePose parts (I = 1..=24).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Region {
    Head,
    /// Torso and arms: what a top or jacket covers.
    Upper,
    /// Legs: trousers, skirt.
    Lower,
    Hands,
    Feet,
    /// `upper` and `lower` together.
    Outfit,
}

impl Region {
    pub const ALL: [Region; 6] = [
        Region::Head,
        Region::Upper,
        Region::Lower,
        Region::Hands,
        Region::Feet,
        Region::Outfit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Region::Head => "head",
            Region::Upper => "upper",
            Region::Lower => "lower",
            Region::Hands => "hands",
            Region::Feet => "feet",
            Region::Outfit => "outfit",
        }
    }

    /// DensePose part indices (1 torso back, 2 torso front, 3-4 hands, 5-6 feet, 7-14 legs,
    /// 15-22 arms, 23-24 head).
    pub fn parts(self) -> &'static [u8] {
        match self {
            Region::Head => &[23, 24],
            Region::Upper => &[1, 2, 15, 16, 17, 18, 19, 20, 21, 22],
            Region::Lower => &[7, 8, 9, 10, 11, 12, 13, 14],
            Region::Hands => &[3, 4],
            Region::Feet => &[5, 6],
            Region::Outfit => &[
                1, 2, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
            ],
        }
    }

    pub fn contains(self, part: u8) -> bool {
        self.parts().contains(&part)
    }

    /// "head, upper, lower, hands, feet, outfit", for error messages and help.
    pub fn valid_names() -> String {
        Self::ALL.map(|r| r.name()).join(", ")
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Region {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|r| r.name() == t)
            .ok_or_else(|| {
                Error::msg(format!(
                    "unknown region {s:?}; valid regions: {}",
                    Self::valid_names()
                ))
            })
    }
}

/// The DensePose part (1..=24, 0 where no body surface maps) of each texel of the 512x512
/// texture, row-major.
#[derive(Debug, Clone)]
pub struct TexelParts {
    parts: Vec<u8>,
}

impl TexelParts {
    /// The table built into the binary (the one `mcld prepare` and `infer` build textures with).
    pub fn builtin() -> Result<Self> {
        Ok(Self::from_assets(&TextureAssets::builtin()?))
    }

    pub fn from_assets(assets: &TextureAssets) -> Self {
        // The table stores I - 1 (0..23) and -1 for texels outside every part.
        let parts = assets
            .texel_parts()
            .iter()
            .map(|&p| if p < 0 { 0 } else { p as u8 + 1 })
            .collect();
        Self { parts }
    }

    /// From part indices as above (0 = none, 1..=24), one per texel of a 512x512 texture.
    pub fn from_parts(parts: Vec<u8>) -> Result<Self> {
        if parts.len() != NORMAL * NORMAL {
            return Err(Error::msg(format!(
                "texel part table has {} entries, expected {NORMAL}x{NORMAL}",
                parts.len()
            )));
        }
        if let Some(p) = parts.iter().find(|&&p| p as usize > PARTS) {
            return Err(Error::msg(format!(
                "texel part table holds part {p}, outside 0..={PARTS}"
            )));
        }
        Ok(Self { parts })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.parts
    }

    /// How many texels of the texture belong to `region`.
    pub fn region_texels(&self, region: Region) -> usize {
        self.parts.iter().filter(|&&p| region.contains(p)).count()
    }
}

/// How much of a region the donor's texture map had seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    pub region: Region,
    /// Texels of the region in the texture layout.
    pub texels: usize,
    /// Of those, texels where the donor's map is not empty (and so were taken from the donor).
    pub covered: usize,
}

impl Coverage {
    /// `covered / texels` (0 for an empty region).
    pub fn fraction(&self) -> f64 {
        if self.texels == 0 {
            0.0
        } else {
            self.covered as f64 / self.texels as f64
        }
    }
}

/// A texture map of the wrong size is an error naming the file: composition is per texel of
/// the 512x512 layout, so a resized or foreign image would silently mix unrelated body parts.
pub fn check_texture(img: &RgbImage, path: &Path, role: &str) -> Result<()> {
    if (img.width() as usize, img.height() as usize) == (NORMAL, NORMAL) {
        return Ok(());
    }
    Err(Error::input(
        path,
        format!(
            "{role} is {}x{}, but a texture map is {NORMAL}x{NORMAL} (the UV layout `mcld \
             prepare` and `mcld infer --save-texture` write); regions are composed texel by \
             texel, so it cannot be resized",
            img.width(),
            img.height()
        ),
    ))
}

/// `base` with `region` taken from `donor`: inside the region every texel is the donor's where
/// the donor has one (not all-zero) and the base's where the donor's map is empty (a part its
/// photo never showed); outside the region every texel is the base's.
///
/// All-zero means "never seen" because texture maps leave unseen texels black (SPEC §2: black
/// photo pixels count as empty and nothing outside the dilated seen area is kept).
pub fn compose_region(
    base: &RgbImage,
    donor: &RgbImage,
    region: Region,
    parts: &TexelParts,
) -> Result<(RgbImage, Coverage)> {
    for (what, img) in [("source texture", base), ("donor texture", donor)] {
        if (img.width() as usize, img.height() as usize) != (NORMAL, NORMAL) {
            return Err(Error::msg(format!(
                "{what} is {}x{}, expected {NORMAL}x{NORMAL}",
                img.width(),
                img.height()
            )));
        }
    }
    let mut out = base.clone();
    let mut cov = Coverage {
        region,
        texels: 0,
        covered: 0,
    };
    for ((o, d), &p) in out
        .as_mut()
        .chunks_exact_mut(3)
        .zip(donor.as_raw().chunks_exact(3))
        .zip(&parts.parts)
    {
        if !region.contains(p) {
            continue;
        }
        cov.texels += 1;
        if d.iter().any(|&v| v != 0) {
            o.copy_from_slice(d);
            cov.covered += 1;
        }
    }
    Ok((out, cov))
}
