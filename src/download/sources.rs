//! The one table of what `mcld download` fetches: every file a command reads, where it comes
//! from, where it goes and how it is checked. `--list` prints it; the missing-model messages of
//! the other commands name its groups and ids.
//!
//! Destinations are the paths the commands look up: `pipeline::weight_files` (checkpoints and the
//! `train.yaml` base-model folders; the model files are named through `weights::files`, as the
//! loaders name them), `models::densepose::WEIGHTS_FILE`,
//! `models::face::{DETECTOR_ONNX, RECOGNISER_ONNX}` under `antelopev2/`, the first names of
//! `evaluate::{inception_file_names, METRIC_WEIGHTS}` and `metrics::face`'s `buffalo_s/`.

/// Which of the two output folders a destination is relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// `--dir` (default `./pretrained_weights`).
    Pretrained,
    /// `--ckpt_dir` (default `./checkpoints`).
    Checkpoints,
}

/// The command a file is for; `--only` takes these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    Inference,
    Train,
    Prepare,
    Evaluate,
}

impl Group {
    pub const ALL: [Group; 4] = [
        Group::Inference,
        Group::Train,
        Group::Prepare,
        Group::Evaluate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Group::Inference => "inference",
            Group::Train => "train",
            Group::Prepare => "prepare",
            Group::Evaluate => "evaluate",
        }
    }

    pub fn parse(s: &str) -> Option<Group> {
        Group::ALL.into_iter().find(|g| g.name() == s)
    }
}

/// What the source publishes about a file's content, checked before it gets its final name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Nothing published (the Hub's LFS files are still checked against their ETag).
    None,
    /// The full SHA-256, as the registry publishes it (lower-case hex).
    Sha256(&'static str),
    /// torch.hub's convention: the file name ends in `-<leading hex digits of its SHA-256>.ext`
    /// (torchvision verifies it with `check_hash=True`); the digits are read from the URL.
    NamePrefix,
}

/// One member kept from a zip: matched by its path (or a path ending in `/name`, since packs
/// nest their folders differently), written to `dest`; the rest of the archive is dropped.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    pub name: &'static str,
    pub dest: &'static str,
    pub sha256: Option<&'static str>,
}

#[derive(Debug, Clone, Copy)]
pub enum Origin {
    /// A file of a Hugging Face Hub model repo (branch `main`). The first of `choices` the repo
    /// has is fetched (safetensors before pickles) and placed at `dest/<its path in the repo>`;
    /// any of them already there counts as present.
    Hub {
        repo: &'static str,
        choices: &'static [&'static str],
    },
    /// One network's weights in a Hub repo whose layout is not known in advance (the MCLD
    /// release): the repo's file listing is read and the file whose name contains one of `keys`
    /// is fetched (`.safetensors` before `.pth` before `.bin`, from any folder), then placed at
    /// `dest/NAME.EXT` with `NAME = names[0]`, the name the loaders read. A file under any of
    /// `names` (any of those extensions) already there counts as present.
    HubListed {
        repo: &'static str,
        keys: &'static [&'static str],
        names: &'static [&'static str],
    },
    /// A plain HTTP(S) file, written to `dest`.
    Url { url: &'static str, check: Check },
    /// A zip of which only `members` are kept (`dest` is unused).
    Zip {
        url: &'static str,
        check: Check,
        members: &'static [Member],
    },
}

/// How big a file is: exact when the source publishes it (then checked), else a rough figure
/// for `--list` and the overall progress bar until the server states the real one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Unknown,
    About(u64),
    Exact(u64),
}

impl Size {
    pub fn estimate(self) -> Option<u64> {
        match self {
            Size::Unknown => None,
            Size::About(n) | Size::Exact(n) => Some(n),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Source {
    /// Short name; `--only` takes it as well as the group names.
    pub id: &'static str,
    pub group: Group,
    /// Fetched only when `--only` names its id (not by its group).
    pub optional: bool,
    pub what: &'static str,
    pub root: Root,
    pub dest: &'static str,
    pub origin: Origin,
    pub size: Size,
}

const MB: u64 = 1_000_000;

const fn hub(
    id: &'static str,
    group: Group,
    what: &'static str,
    (root, dest): (Root, &'static str),
    repo: &'static str,
    choices: &'static [&'static str],
    size: Size,
) -> Source {
    Source {
        id,
        group,
        optional: false,
        what,
        root,
        dest,
        origin: Origin::Hub { repo, choices },
        size,
    }
}

/// An MCLD network picked from the listing of the release repo (its file names were never
/// published, so none is assumed).
const fn listed(
    what: &'static str,
    keys: &'static [&'static str],
    names: &'static [&'static str],
) -> Source {
    Source {
        id: "mcld",
        group: Group::Inference,
        optional: false,
        what,
        root: Root::Checkpoints,
        dest: "",
        origin: Origin::HubListed {
            repo: MCLD_REPO,
            keys,
            names,
        },
        size: Size::Unknown,
    }
}

/// The extensions the checkpoint loaders read, in the order a listing is searched.
pub const WEIGHT_EXTENSIONS: [&str; 3] = ["safetensors", "pth", "bin"];

/// The file of `listing` (paths in the repo) holding the weights `keys` name: a weight file
/// whose name contains a key; ties go to `.safetensors` before `.pth` before `.bin`, then to a
/// name that is exactly a key, then to the shallower and alphabetically first path.
pub fn pick_listed<'a>(listing: &'a [String], keys: &[&str]) -> Option<&'a str> {
    listing
        .iter()
        .filter_map(|path| {
            let name = path.rsplit('/').next()?.to_ascii_lowercase();
            let (stem, ext) = name.rsplit_once('.')?;
            let ext_rank = WEIGHT_EXTENSIONS.iter().position(|e| *e == ext)?;
            if !keys.iter().any(|k| stem.contains(k)) {
                return None;
            }
            let inexact = !keys.contains(&stem);
            let depth = path.matches('/').count();
            Some(((ext_rank, inexact, depth, path.as_str()), path.as_str()))
        })
        .min()
        .map(|(_, p)| p)
}

/// The authors' Google Drive folder of the trained checkpoints (linked in their README), the
/// way in when the Hub repo is missing or holds something else.
pub const MCLD_DRIVE: &str =
    "https://drive.google.com/drive/folders/18643_1GmWWLcKCruKqrfHaecejy-U93x";

use crate::weights::files::{
    self, CONTROLNET_SEG_DIR, DENOISING_UNET, IMAGE_PROJECTOR, IMAGE_PROJ_MODEL,
    IMAGE_VARIATIONS_DIR, POSE_GUIDER, REFERENCE_UNET, SD15_DIR, VAE_DIR,
};

const SD15: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";
const VAE: &str = "stabilityai/sd-vae-ft-mse";
const SDIV: &str = "lambdalabs/sd-image-variations-diffusers";
/// The Hub repo the MCLD checkpoints are fetched from.
pub const MCLD_REPO: &str = "Lotior/mcld";
const SEG: &str = "lllyasviel/control_v11p_sd15_seg";

/// Everything `mcld download` knows. Sizes marked `About` are rough (for the progress bar only).
pub const SOURCES: &[Source] = &[
    // inference: `PipelineFiles::resolve` with the paths of configs/train/train.yaml.
    hub(
        "sd15",
        Group::Inference,
        "SD-1.5 UNet config (both UNets are built from it)",
        (Root::Pretrained, SD15_DIR),
        SD15,
        &[files::UNET_CONFIG],
        Size::Unknown,
    ),
    hub(
        "vae",
        Group::Inference,
        "VAE config",
        (Root::Pretrained, VAE_DIR),
        VAE,
        &[files::CONFIG],
        Size::Unknown,
    ),
    hub(
        "vae",
        Group::Inference,
        "VAE weights",
        (Root::Pretrained, VAE_DIR),
        VAE,
        &files::DIFFUSERS_WEIGHTS,
        Size::About(335 * MB),
    ),
    hub(
        "image_encoder",
        Group::Inference,
        "CLIP ViT-L/14 image encoder config",
        (Root::Pretrained, IMAGE_VARIATIONS_DIR),
        SDIV,
        &[files::IMAGE_ENCODER_CONFIG],
        Size::Unknown,
    ),
    hub(
        "image_encoder",
        Group::Inference,
        "CLIP ViT-L/14 image encoder weights",
        (Root::Pretrained, IMAGE_VARIATIONS_DIR),
        SDIV,
        &files::IMAGE_ENCODER_WEIGHTS,
        Size::About(1_220 * MB),
    ),
    listed(
        "MCLD denoising UNet",
        &[DENOISING_UNET.stem],
        &[DENOISING_UNET.stem],
    ),
    listed(
        "MCLD reference UNet",
        &[REFERENCE_UNET.stem],
        &[REFERENCE_UNET.stem],
    ),
    listed("MCLD pose guider", &[POSE_GUIDER.stem], &[POSE_GUIDER.stem]),
    listed(
        "MCLD image projector",
        &[IMAGE_PROJECTOR.stem, "image_proj"],
        &[IMAGE_PROJECTOR.stem, IMAGE_PROJ_MODEL.stem],
    ),
    // train: base_model_path's unet/ and the pose guider's initialisation.
    hub(
        "unet",
        Group::Train,
        "SD image-variations UNet config",
        (Root::Pretrained, IMAGE_VARIATIONS_DIR),
        SDIV,
        &[files::UNET_CONFIG],
        Size::Unknown,
    ),
    hub(
        "unet",
        Group::Train,
        "SD image-variations UNet weights (initialises both UNets)",
        (Root::Pretrained, IMAGE_VARIATIONS_DIR),
        SDIV,
        &files::UNET_WEIGHTS,
        Size::About(3_440 * MB),
    ),
    hub(
        "controlnet_seg",
        Group::Train,
        "ControlNet v1.1 seg config",
        (Root::Pretrained, CONTROLNET_SEG_DIR),
        SEG,
        &[files::CONFIG],
        Size::Unknown,
    ),
    hub(
        "controlnet_seg",
        Group::Train,
        "ControlNet v1.1 seg weights (initialise the pose guider)",
        (Root::Pretrained, CONTROLNET_SEG_DIR),
        SEG,
        &files::DIFFUSERS_WEIGHTS,
        Size::About(1_450 * MB),
    ),
    // prepare (and infer without --texture/--face).
    Source {
        id: "densepose",
        group: Group::Prepare,
        optional: false,
        what: "DensePose R-CNN R-101-FPN DL s1x (detectron2 model zoo)",
        root: Root::Pretrained,
        dest: "model_final_844d15.pkl",
        // detectron2 does not say what its 6-digit suffix hashes, so it is not checked.
        origin: Origin::Url {
            url: "https://dl.fbaipublicfiles.com/densepose/densepose_rcnn_R_101_FPN_DL_s1x/165712116/model_final_844d15.pkl",
            check: Check::None,
        },
        size: Size::About(255 * MB),
    },
    Source {
        id: "antelopev2",
        group: Group::Prepare,
        optional: false,
        what: "InsightFace antelopev2 (SCRFD-10G detector, glintr100 ArcFace)",
        root: Root::Pretrained,
        dest: "",
        origin: Origin::Zip {
            url: "https://github.com/deepinsight/insightface/releases/download/v0.7/antelopev2.zip",
            check: Check::None,
            members: &[
                Member {
                    name: "scrfd_10g_bnkps.onnx",
                    dest: "antelopev2/scrfd_10g_bnkps.onnx",
                    sha256: None,
                },
                Member {
                    name: "glintr100.onnx",
                    dest: "antelopev2/glintr100.onnx",
                    sha256: None,
                },
            ],
        },
        size: Size::About(361 * MB),
    },
    // evaluate.
    Source {
        id: "inception",
        group: Group::Evaluate,
        optional: false,
        what: "torchvision Inception-V3 IMAGENET1K_V1 (FID)",
        root: Root::Pretrained,
        dest: "inception_v3_google-0cc3c7bd.pth",
        origin: Origin::Url {
            url: "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
            check: Check::NamePrefix,
        },
        size: Size::Exact(108_949_747),
    },
    Source {
        id: "alexnet",
        group: Group::Evaluate,
        optional: false,
        what: "torchvision AlexNet (LPIPS trunk)",
        root: Root::Pretrained,
        dest: "alexnet-owt-7be5be79.pth",
        origin: Origin::Url {
            url: "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
            check: Check::NamePrefix,
        },
        size: Size::About(244 * MB),
    },
    Source {
        id: "lpips",
        group: Group::Evaluate,
        optional: false,
        what: "LPIPS v0.1 linear heads (inside the lpips 0.1.4 wheel)",
        root: Root::Pretrained,
        dest: "",
        origin: Origin::Zip {
            url: "https://files.pythonhosted.org/packages/9b/13/1df50c7925d9d2746702719f40e864f51ed66f307b20ad32392f1ad2bb87/lpips-0.1.4-py3-none-any.whl",
            // PyPI's published digest of the wheel, and of the member as shipped in it.
            check: Check::Sha256("fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e"),
            members: &[Member {
                name: "lpips/weights/v0.1/alex.pth",
                dest: "lpips/alex.pth",
                sha256: Some("df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"),
            }],
        },
        size: Size::Exact(53_763),
    },
    Source {
        id: "buffalo_s",
        group: Group::Evaluate,
        optional: false,
        what: "InsightFace buffalo_s (face similarity)",
        root: Root::Pretrained,
        dest: "",
        origin: Origin::Zip {
            url: "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_s.zip",
            check: Check::None,
            members: &[
                Member {
                    name: "det_500m.onnx",
                    dest: "buffalo_s/det_500m.onnx",
                    sha256: None,
                },
                Member {
                    name: "w600k_mbf.onnx",
                    dest: "buffalo_s/w600k_mbf.onnx",
                    sha256: None,
                },
            ],
        },
        size: Size::About(122 * MB),
    },
    Source {
        id: "pt_inception",
        group: Group::Evaluate,
        optional: true,
        what: "pytorch-fid's TF Inception (--fid-backbone pt_inception)",
        root: Root::Pretrained,
        dest: "pt_inception-2015-12-05-6726825d.pth",
        // pytorch-fid loads it without check_hash, so the suffix is not known to be a SHA-256.
        origin: Origin::Url {
            url: "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
            check: Check::None,
        },
        size: Size::About(96 * MB),
    },
];

/// The hex digits torch.hub reads from a file name (`-([a-f0-9]*)\.`: the first such run).
pub fn name_hash_prefix(url: &str) -> Option<&str> {
    let name = url.rsplit('/').next()?;
    let bytes = name.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b != b'-' {
            continue;
        }
        let run = bytes[i + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
            .count();
        if bytes.get(i + 1 + run) == Some(&b'.') {
            return Some(&name[i + 1..i + 1 + run]);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_weights_prefer_safetensors_then_exact_names() {
        let l: Vec<String> = [
            "README.md",
            "ckpt/denoising_unet-30000.pth",
            "ckpt/denoising_unet.pth",
            "old/denoising_unet.bin",
            "ckpt/reference_unet.pth",
            "image_proj_model.pth",
            "pose_guider.safetensors",
            "ckpt/pose_guider.pth",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            pick_listed(&l, &["denoising_unet"]),
            Some("ckpt/denoising_unet.pth")
        );
        assert_eq!(
            pick_listed(&l, &["pose_guider"]),
            Some("pose_guider.safetensors")
        );
        assert_eq!(
            pick_listed(&l, &["image_projector", "image_proj"]),
            Some("image_proj_model.pth")
        );
        assert_eq!(pick_listed(&l[..1], &["denoising_unet"]), None);
    }

    #[test]
    fn hash_prefix_follows_torch_hub() {
        assert_eq!(
            name_hash_prefix("https://x/models/inception_v3_google-0cc3c7bd.pth"),
            Some("0cc3c7bd")
        );
        assert_eq!(
            name_hash_prefix("https://x/pt_inception-2015-12-05-6726825d.pth"),
            Some("6726825d")
        );
        assert_eq!(name_hash_prefix("https://x/model_final_844d15.pkl"), None);
    }

    #[test]
    fn every_checked_name_has_a_prefix_and_ids_are_unique_per_group() {
        for s in SOURCES {
            if let Origin::Url {
                url,
                check: Check::NamePrefix,
            } = s.origin
            {
                let p = name_hash_prefix(url).unwrap_or("");
                assert!(p.len() >= 8, "{url}");
            }
            assert!(Group::parse(s.id).is_none(), "id {} is a group name", s.id);
            for t in SOURCES {
                if t.id == s.id {
                    assert_eq!(t.group, s.group, "{}", s.id);
                }
            }
        }
    }
}
