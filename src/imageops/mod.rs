//! Image resizes that match the reference bit for bit (Pillow's fixed-point resampler and
//! torch's `F.interpolate` kernels), plus image file reading. Exactness matters because the
//! evaluated numbers (FID, SSIM, ...) are computed on these resized bytes.

pub mod grid;
pub mod pillow;
pub mod text;
pub mod torch;
pub mod viz;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};

pub use pillow::Filter;
pub use torch::{
    interpolate_aa, interpolate_bilinear, interpolate_nearest, quantize_trunc, AaMode,
};

use crate::{Error, Result};

/// An 8-bit image in row-major interleaved (H, W, C) order, C = 1 (L) or 3 (RGB) usually.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct U8Image {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl U8Image {
    /// Wraps a buffer, checking that its length fits the shape.
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Self> {
        let img = Self {
            width,
            height,
            channels,
            data,
        };
        img.validate()?;
        Ok(img)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.width == 0 || self.height == 0 || self.channels == 0 {
            return Err(Error::msg(format!(
                "image of size {}x{}x{} is empty",
                self.width, self.height, self.channels
            )));
        }
        if self.data.len() != self.width * self.height * self.channels {
            return Err(Error::msg(format!(
                "image buffer has {} bytes, expected {}x{}x{}",
                self.data.len(),
                self.height,
                self.width,
                self.channels
            )));
        }
        Ok(())
    }

    pub fn from_rgb(img: &RgbImage) -> Self {
        Self {
            width: img.width() as usize,
            height: img.height() as usize,
            channels: 3,
            data: img.as_raw().clone(),
        }
    }

    pub fn from_gray(img: &GrayImage) -> Self {
        Self {
            width: img.width() as usize,
            height: img.height() as usize,
            channels: 1,
            data: img.as_raw().clone(),
        }
    }

    /// Back to an `image::RgbImage`; fails unless the image has 3 channels.
    pub fn to_rgb(&self) -> Result<RgbImage> {
        if self.channels != 3 {
            return Err(Error::msg(format!(
                "expected an RGB image, got {} channels",
                self.channels
            )));
        }
        RgbImage::from_raw(self.width as u32, self.height as u32, self.data.clone())
            .ok_or_else(|| Error::msg("image buffer does not match its size"))
    }

    /// Reads an image file (PNG, JPEG) as RGB; errors name the file.
    pub fn open_rgb(path: &Path) -> Result<Self> {
        Ok(Self::from_rgb(&open_rgb(path)?))
    }

    /// `(H, W, C)` uint8 tensor on `device`.
    pub fn to_tensor_hwc(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.data.clone(),
            (self.height, self.width, self.channels),
            device,
        )?)
    }

    /// From an `(H, W, C)` uint8 tensor.
    pub fn from_tensor_hwc(t: &Tensor) -> Result<Self> {
        let (h, w, c) = t.dims3()?;
        let data = t.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
        Self::new(w, h, c, data)
    }

    /// Pillow `Image.resize((width, height), filter)`.
    pub fn resize(&self, width: usize, height: usize, filter: Filter) -> Result<Self> {
        pillow::resize(self, width, height, filter)
    }
}

/// Opens an image file and converts it to RGB, like `Image.open(p).convert("RGB")`.
pub fn open_rgb(path: &Path) -> Result<RgbImage> {
    Ok(open_image(path)?.to_rgb8())
}

/// Decodes an image file. JPEGs go through libjpeg-turbo's decoder (as built by mozjpeg: ISLOW
/// IDCT and fancy upsampling, what Pillow and OpenCV use), so dataset photos have the
/// reference's pixels exactly; the `image` crate's JPEG decoder differs by up to 4 levels.
/// Other formats, and JPEGs libjpeg cannot turn into RGB (CMYK), go through `image`.
pub fn open_image(path: &Path) -> Result<image::DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, path)
}

/// [`open_image`] on bytes already in memory (an upload); `name` only labels the errors.
pub fn decode_image(bytes: &[u8], name: &Path) -> Result<image::DynamicImage> {
    let path = name;
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        match decode_jpeg_libjpeg(bytes) {
            Ok(Some(img)) => return Ok(img),
            Ok(None) => {}
            Err(JpegTruncated) => {
                return Err(Error::input(
                    path,
                    format!(
                        "cannot decode image: truncated JPEG, the data ends before the image \
                         does ({} bytes); the file is incomplete",
                        bytes.len()
                    ),
                ))
            }
        }
    }
    image::load_from_memory(bytes)
        .map_err(|e| Error::input(path, format!("cannot decode image: {e}")))
}

/// [`open_image`] with the EXIF orientation applied, as OpenCV's `imread` does.
pub fn open_image_oriented(path: &Path) -> Result<image::DynamicImage> {
    use image::ImageDecoder;
    let orientation = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .into_decoder()
        .and_then(|mut d| d.orientation())
        .map_err(|e| Error::input(path, format!("cannot decode image: {e}")))?;
    let mut img = open_image(path)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// libjpeg ran out of data before the last scanline: Pillow refuses such a file ("image file is
/// truncated"), libjpeg alone would fill the rest with gray and only warn.
struct JpegTruncated;

/// Any other fatal libjpeg error; `image` then decodes (or names the problem).
struct JpegFatal;

/// libjpeg's `error_exit` must not return: unwind to the `catch_unwind` in
/// [`decode_jpeg_libjpeg`] (`resume_unwind` skips the panic hook, so nothing is printed).
extern "C-unwind" fn jpeg_error_exit(_cinfo: &mut mozjpeg_sys::jpeg_common_struct) {
    std::panic::resume_unwind(Box::new(JpegFatal));
}

/// Warnings are ignored as Pillow ignores them (corrupt-data warnings still give an image),
/// except the end of the data, which Pillow treats as an error.
extern "C-unwind" fn jpeg_emit_message(
    cinfo: &mut mozjpeg_sys::jpeg_common_struct,
    level: std::os::raw::c_int,
) {
    // SAFETY: libjpeg calls this with `err` pointing at the error manager set up below, which
    // outlives the decompressor.
    let code = unsafe { cinfo.err.as_ref() }.map(|e| e.msg_code);
    if level < 0 && code == Some(mozjpeg_sys::JWRN_JPEG_EOF) {
        std::panic::resume_unwind(Box::new(JpegTruncated));
    }
}

fn jpeg_error_mgr() -> mozjpeg_sys::jpeg_error_mgr {
    // SAFETY: jpeg_std_error fills every field of a zeroed manager (a plain C struct of
    // function pointers and integers, for which all-zero is a valid value).
    let mut err: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    err.error_exit = Some(jpeg_error_exit);
    err.emit_message = Some(jpeg_emit_message);
    err
}

/// libjpeg decode to RGB. `Ok(None)`: libjpeg could not (CMYK, a fatal error): let `image`
/// try, whose error message then names the problem. `Err`: the data is cut short.
fn decode_jpeg_libjpeg(
    bytes: &[u8],
) -> std::result::Result<Option<image::DynamicImage>, JpegTruncated> {
    let run = || -> std::io::Result<Option<image::DynamicImage>> {
        let mut dec = mozjpeg::Decompress::builder()
            .with_err(jpeg_error_mgr())
            .from_mem(bytes)?
            .rgb()?;
        let (w, h) = (dec.width() as u32, dec.height() as u32);
        let px: Vec<[u8; 3]> = dec.read_scanlines()?;
        dec.finish()?;
        Ok(RgbImage::from_raw(w, h, px.into_flattened()).map(image::DynamicImage::ImageRgb8))
    };
    match std::panic::catch_unwind(run) {
        Ok(r) => Ok(r.ok().flatten()),
        Err(payload) if payload.is::<JpegTruncated>() => Err(JpegTruncated),
        Err(_) => Ok(None),
    }
}

/// Pillow bicubic resize of an RGB image to (height, width): torchvision's
/// `Resize([h, w], BICUBIC, antialias=True)` on a PIL image, used for the ground truth.
pub fn pil_resize_rgb(img: &RgbImage, (h, w): (usize, usize), filter: Filter) -> Result<RgbImage> {
    U8Image::from_rgb(img).resize(w, h, filter)?.to_rgb()
}

fn chw_dims(t: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match t.dims() {
        [c, h, w] => Ok((1, *c, *h, *w)),
        [n, c, h, w] => Ok((*n, *c, *h, *w)),
        d => Err(Error::msg(format!(
            "expected a (C, H, W) or (N, C, H, W) tensor, got shape {d:?}"
        ))),
    }
}

/// Runs a per-plane resize on a CHW/NCHW tensor: on the CPU in f32, the result returned to
/// `t`'s device (in f32) with the last two dimensions replaced by `size`.
fn map_planes(
    t: &Tensor,
    size: (usize, usize),
    f: impl FnOnce(&[f32], usize, (usize, usize)) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let (n, c, h, w) = chw_dims(t)?;
    let x = t
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let y = f(&x, n * c, (h, w))?;
    let mut dims = t.dims().to_vec();
    let k = dims.len();
    dims[k - 2] = size.0;
    dims[k - 1] = size.1;
    Ok(Tensor::from_vec(y, dims, &Device::Cpu)?.to_device(t.device())?)
}

/// `F.interpolate(t, (h, w), mode, antialias=True)` for a CHW/NCHW float tensor; computed on
/// the CPU in f32 (the result returns to `t`'s device, in f32).
pub fn tensor_interpolate_aa(t: &Tensor, size: (usize, usize), mode: AaMode) -> Result<Tensor> {
    map_planes(t, size, |x, planes, hw| {
        interpolate_aa(x, planes, hw, size, mode)
    })
}

/// `F.interpolate(t, (h, w), mode="bilinear", align_corners=False)` for a CHW/NCHW tensor.
pub fn tensor_interpolate_bilinear(t: &Tensor, size: (usize, usize)) -> Result<Tensor> {
    map_planes(t, size, |x, planes, hw| {
        interpolate_bilinear(x, planes, hw, size)
    })
}

/// The reference's output post-processing: a (3, H, W) image in [0, 1] -> antialiased bicubic
/// to (h, w) -> `(y * 255).clamp(0, 255).to(uint8)` (truncation) -> RGB bytes.
pub fn generated_to_rgb(t: &Tensor, size: (usize, usize)) -> Result<RgbImage> {
    let (n, c, _, _) = chw_dims(t)?;
    if n != 1 || c != 3 {
        return Err(Error::msg(format!(
            "expected one (3, H, W) image, got shape {:?}",
            t.dims()
        )));
    }
    let y = tensor_interpolate_aa(t, size, AaMode::Bicubic)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (h, w) = size;
    let plane = h * w;
    let mut data = vec![0u8; plane * 3];
    for (i, px) in data.chunks_mut(3).enumerate() {
        for (ch, v) in px.iter_mut().enumerate() {
            *v = quantize_trunc(y[ch * plane + i]);
        }
    }
    RgbImage::from_raw(w as u32, h as u32, data)
        .ok_or_else(|| Error::msg("generated image buffer does not match its size"))
}
