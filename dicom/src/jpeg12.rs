//! 12-bit JPEG Extended (process 2 and 4, transfer syntax 1.2.840.10008.1.2.4.51), which older CR and DX archives
//! hold and jpeg-decoder (dicom-rs's JPEG codec) refuses: decoded by libjpeg-turbo 3's TurboJPEG API, whose 12-bit
//! path is the IJG reference decoder's.

use std::ffi::{CStr, c_int};

use turbojpeg_sys as tj;

/// The JPEG Extended (process 2 and 4) transfer syntax.
pub const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";

/// One decoded greyscale frame: samples 0..4096, row-major.
pub struct Frame {
    pub width: usize,
    pub height: usize,
    pub samples: Vec<u16>,
}

/// A TurboJPEG decompressor, destroyed on drop.
struct Decompressor(tj::tjhandle);

impl Decompressor {
    fn new() -> Result<Self, String> {
        // SAFETY: tj3Init has no preconditions; a null handle is its error.
        let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if handle.is_null() {
            return Err("libjpeg-turbo could not start a decompressor".into());
        }
        Ok(Self(handle))
    }

    fn error(&self) -> String {
        // SAFETY: the handle is live; tj3GetErrorStr returns a NUL-terminated string it owns.
        let text = unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) };
        text.to_string_lossy().into_owned()
    }

    fn get(&self, param: tj::TJPARAM) -> c_int {
        // SAFETY: the handle is live and param one of the API's constants.
        unsafe { tj::tj3Get(self.0, param as c_int) }
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

/// Decodes one greyscale JPEG stream of 9 to 12 bits a sample (one DICOM frame's fragments, joined); `None` for a
/// stream this decoder is not for (8 bits, or a header that does not parse), which dicom-rs then decodes or names.
pub fn decode(jpeg: &[u8]) -> Result<Option<Frame>, String> {
    let d = Decompressor::new()?;
    // SAFETY: the buffer is valid for its length; TurboJPEG only reads it.
    if unsafe { tj::tj3DecompressHeader(d.0, jpeg.as_ptr(), jpeg.len() as _) } != 0 {
        return Ok(None);
    }
    let precision = d.get(tj::TJPARAM_TJPARAM_PRECISION);
    if precision <= 8 {
        return Ok(None);
    }
    if precision > 12 {
        return Err(format!(
            "a {precision}-bit lossy JPEG stream (at most 12 bits)"
        ));
    }
    if d.get(tj::TJPARAM_TJPARAM_COLORSPACE) != tj::TJCS_TJCS_GRAY as c_int {
        return Err("a colour JPEG stream (radiographs are greyscale)".into());
    }
    let width = usize::try_from(d.get(tj::TJPARAM_TJPARAM_JPEGWIDTH)).unwrap_or(0);
    let height = usize::try_from(d.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT)).unwrap_or(0);
    if width == 0 || height == 0 || (width * height) as u64 > super::MAX_PIXELS {
        return Err(format!("a JPEG frame of {width}x{height} samples"));
    }
    let mut out = vec![0i16; width * height];
    // SAFETY: `out` holds width*height greyscale samples (pitch 0 = width); the header was read by this handle.
    let rc = unsafe {
        tj::tj3Decompress12(
            d.0,
            jpeg.as_ptr(),
            jpeg.len() as _,
            out.as_mut_ptr(),
            0,
            tj::TJPF_TJPF_GRAY as c_int,
        )
    };
    if rc != 0 {
        return Err(format!(
            "the 12-bit JPEG stream does not decode: {}",
            d.error()
        ));
    }
    // 12-bit samples are 0..4096, so the i16 -> u16 reinterpretation is exact.
    let samples = out.into_iter().map(|s| s as u16).collect();
    Ok(Some(Frame {
        width,
        height,
        samples,
    }))
}
