//! Feature files: `[N, D]` float32 or float64 `.npy` arrays as other tools write them (numpy.save).

use std::path::Path;

use crate::{EvalError, Features};

/// Reads `path` as features named by the path: a 2-D float32 or float64 array (C or Fortran order).
pub fn read_npy(path: &Path) -> Result<Features, EvalError> {
    let name = path.display().to_string();
    let bad = |reason: String| EvalError::Shape {
        what: name.clone(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot be read: {e}")))?;
    let npy =
        npyz::NpyFile::new(&bytes[..]).map_err(|e| bad(format!("is not a .npy file: {e}")))?;
    let shape = npy.shape().to_vec();
    let [rows, dim] = shape[..] else {
        return Err(bad(format!(
            "holds an array of shape {shape:?}; features are [N, D]"
        )));
    };
    let (rows, dim) = (rows as usize, dim as usize);
    let fortran = npy.order() == npyz::Order::Fortran;
    let descr = npy.dtype().descr();
    let values: Vec<f64> = match descr.trim_matches(|c| c == '\'' || c == '"') {
        "<f8" | ">f8" => npy.into_vec::<f64>(),
        "<f4" | ">f4" => npy
            .into_vec::<f32>()
            .map(|v| v.into_iter().map(f64::from).collect()),
        other => {
            return Err(bad(format!(
                "has dtype {other}; features are float32 or float64"
            )));
        }
    }
    .map_err(|e| bad(format!("cannot be decoded: {e}")))?;
    let values = if fortran {
        (0..rows * dim)
            .map(|k| values[(k % dim) * rows + k / dim])
            .collect()
    } else {
        values
    };
    if rows == 0 {
        return Err(bad("holds no rows".into()));
    }
    Features::new(&name, dim, values)
}

/// Writes `values` (`rows` x `dim`, row-major) as a float32 `.npy`, as numpy.save would.
pub fn write_npy(path: &Path, values: &[f32], rows: usize, dim: usize) -> std::io::Result<()> {
    use npyz::WriterBuilder as _;
    assert_eq!(values.len(), rows * dim, "whole rows");
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[rows as u64, dim as u64])
        .writer(file)
        .begin_nd()?;
    writer.extend(values.iter().copied())?;
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(shape: &[u64], descr: &str, fortran: bool, payload: &[u8]) -> Vec<u8> {
        let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
        let tuple = if dims.len() == 1 {
            format!("({},)", dims[0])
        } else {
            format!("({})", dims.join(", "))
        };
        let mut header = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {tuple}, }}",
            if fortran { "True" } else { "False" }
        );
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(payload);
        out
    }

    #[test]
    fn float32_float64_and_fortran_order_read_as_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let f64s: Vec<u8> = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let c = dir.join("c.npy");
        std::fs::write(&c, npy(&[3, 2], "<f8", false, &f64s)).unwrap();
        assert_eq!(read_npy(&c).unwrap().row(1), &[3.0, 4.0]);
        // The same values in Fortran order are the transpose's layout: columns first.
        let f = dir.join("f.npy");
        std::fs::write(&f, npy(&[2, 3], "<f8", true, &f64s)).unwrap();
        assert_eq!(read_npy(&f).unwrap().row(0), &[1.0, 3.0, 5.0]);
        let f32s: Vec<u8> = [0.5f32, 1.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let s = dir.join("s.npy");
        std::fs::write(&s, npy(&[1, 2], "<f4", false, &f32s)).unwrap();
        assert_eq!(read_npy(&s).unwrap().row(0), &[0.5, 1.5]);
        let written = dir.join("w.npy");
        write_npy(&written, &[1.0, 2.0, 3.0, 4.5, 5.0, 6.0], 2, 3).unwrap();
        assert_eq!(read_npy(&written).unwrap().row(1), &[4.5, 5.0, 6.0]);
        let one_d = dir.join("v.npy");
        std::fs::write(&one_d, npy(&[2], "<f4", false, &f32s)).unwrap();
        let err = read_npy(&one_d).unwrap_err().to_string();
        assert!(err.contains("v.npy") && err.contains("[N, D]"), "{err}");
        let ints = dir.join("i.npy");
        std::fs::write(&ints, npy(&[1, 2], "<i4", false, &[0; 8])).unwrap();
        assert!(
            read_npy(&ints)
                .unwrap_err()
                .to_string()
                .contains("dtype <i4")
        );
        let nan: Vec<u8> = [1.0f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let n = dir.join("nan.npy");
        std::fs::write(&n, npy(&[1, 2], "<f4", false, &nan)).unwrap();
        let err = read_npy(&n).unwrap_err().to_string();
        assert!(
            err.contains("nan.npy: row 0, column 1 is not finite"),
            "{err}"
        );
    }
}
