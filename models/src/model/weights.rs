//! Weights as safetensors with the PyTorch twin's parameter names; the model config rides in the header
//! metadata (`radit.config`) so a weights file says what it is.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::{Kind, Tensor, nn::VarStore};

use super::ModelError;
use crate::network::Architecture;

const CONFIG_KEY: &str = "radit.config";

/// A weights file's tensors, loaded on the CPU in fp32, and its config if it carries one.
pub struct WeightsFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub config: Option<Architecture>,
}

fn bad(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::BadWeights {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn io(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes every variable of `vs` as fp32 under its name, with `cfg` in the metadata. Written to a temporary file
/// and renamed, so an interrupted save never leaves a truncated file under the final name.
pub fn save_weights(
    vs: &VarStore,
    cfg: &impl serde::Serialize,
    path: &Path,
) -> Result<(), ModelError> {
    let named: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    save_named_weights(&named, cfg, path)
}

/// As [`save_weights`], for weights held by name (e.g. gathered from shards).
pub fn save_named_weights(
    named: &BTreeMap<String, Tensor>,
    cfg: &impl serde::Serialize,
    path: &Path,
) -> Result<(), ModelError> {
    save_named_weights_with(named, cfg, &[], path)
}

/// As [`save_named_weights`], with more metadata.
pub fn save_named_weights_with(
    named: &BTreeMap<String, Tensor>,
    cfg: &impl serde::Serialize,
    extra: &[(&str, &str)],
    path: &Path,
) -> Result<(), ModelError> {
    let config = serde_json::to_string(cfg).map_err(|e| bad(path, e.to_string()))?;
    let mut metadata = vec![(CONFIG_KEY, config.as_str())];
    metadata.extend_from_slice(extra);
    write_safetensors(named, &metadata, path)
}

/// Writes `named` as fp32 safetensors with `metadata` (beside `format = pt`), through a temporary file.
pub fn write_safetensors(
    named: &BTreeMap<String, Tensor>,
    metadata: &[(&str, &str)],
    path: &Path,
) -> Result<(), ModelError> {
    let mut data = Vec::with_capacity(named.len());
    for (name, t) in named {
        let t = t
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous();
        let values = Vec::<f32>::try_from(t.flatten(0, -1))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        data.push((name.clone(), shape, bytes));
    }
    let views = data
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
                .map_err(|e| bad(path, format!("tensor {name}: {e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    metadata.insert("format".into(), "pt".into());
    let tmp = path.with_extension("safetensors.partial");
    safetensors::tensor::serialize_to_file(views, &Some(metadata), &tmp)
        .map_err(|e| bad(&tmp, format!("writing: {e:?}")))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Reads a whole weights file (any float dtype, converted to fp32).
pub fn read_weights(path: &Path) -> Result<WeightsFile, ModelError> {
    let buffer = std::fs::read(path).map_err(|e| io(path, e))?;
    let st = SafeTensors::deserialize(&buffer)
        .map_err(|e| bad(path, format!("not a safetensors file: {e:?}")))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        // A BatchNorm's step counter (PyTorch saves it with the statistics) is bookkeeping, not a weight.
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            other => {
                return Err(bad(
                    path,
                    format!("tensor {name} has dtype {other:?}; expected a float"),
                ));
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?.to_kind(Kind::Float);
        tensors.insert(name, t);
    }
    Ok(WeightsFile {
        tensors,
        config: read_weights_config(path)?,
    })
}

/// The string metadata of a safetensors file's header (empty when it has none).
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>, ModelError> {
    let header = read_header(path)?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// Every tensor's shape, by name, from a safetensors file's header alone (nothing else is read).
pub fn read_shapes(path: &Path) -> Result<BTreeMap<String, Vec<i64>>, ModelError> {
    let header = read_header(path)?;
    let Some(entries) = header.as_object() else {
        return Ok(BTreeMap::new());
    };
    Ok(entries
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .filter_map(|(name, entry)| {
            let shape = entry.get("shape")?.as_array()?;
            Some((
                name.clone(),
                shape.iter().filter_map(serde_json::Value::as_i64).collect(),
            ))
        })
        .collect())
}

/// A safetensors file's JSON header.
fn read_header(path: &Path) -> Result<serde_json::Value, ModelError> {
    let mut f = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(
            path,
            format!("header of {len} bytes; not a safetensors file"),
        ));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| io(path, e))?;
    serde_json::from_slice(&header).map_err(|e| bad(path, format!("header is not JSON: {e}")))
}

/// The config in a weights file's metadata, or `None` when it has none (e.g. exported by PyTorch).
pub fn read_weights_config(path: &Path) -> Result<Option<Architecture>, ModelError> {
    let Some(text) = read_metadata(path)?.remove(CONFIG_KEY) else {
        return Ok(None);
    };
    let cfg: Architecture =
        serde_json::from_str(&text).map_err(|e| bad(path, format!("{CONFIG_KEY}: {e}")))?;
    cfg.validate()?;
    Ok(Some(cfg))
}

/// Loads `path` into the variables of `vs`. Every variable must be present with the same shape and no tensor may
/// be left over; otherwise nothing is changed and the error names the tensors.
pub fn load_weights(vs: &VarStore, path: &Path) -> Result<(), ModelError> {
    let file = read_weights(path)?;
    load_named(vs, &file.tensors, path)
}

/// Copies named tensors into `vs`: every variable must be there with its shape, and nothing else, or nothing is
/// changed. `source` names where the tensors came from, for the error.
pub fn load_named(
    vs: &VarStore,
    tensors: &BTreeMap<String, Tensor>,
    source: &Path,
) -> Result<(), ModelError> {
    let path = source;
    let vars = vs.variables();
    let mut missing: Vec<&str> = vars
        .keys()
        .filter(|n| !tensors.contains_key(*n))
        .map(String::as_str)
        .collect();
    missing.sort();
    let extra: Vec<&str> = tensors
        .keys()
        .filter(|n| !vars.contains_key(*n))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        let list = |v: &[&str]| {
            let shown: Vec<&str> = v.iter().take(5).copied().collect();
            format!(
                "{}{}",
                shown.join(", "),
                if v.len() > 5 { ", ..." } else { "" }
            )
        };
        return Err(bad(
            path,
            format!(
                "does not match the model: {} missing [{}], {} unexpected [{}]",
                missing.len(),
                list(&missing),
                extra.len(),
                list(&extra)
            ),
        ));
    }
    for (name, var) in &vars {
        let src = &tensors[name];
        if src.size() != var.size() {
            return Err(bad(
                path,
                format!(
                    "tensor {name} has shape {:?}, the model has {:?}",
                    src.size(),
                    var.size()
                ),
            ));
        }
    }
    tch::no_grad(|| {
        for (name, var) in &vars {
            let mut var = var.shallow_clone();
            var.f_copy_(&tensors[name].to_device(var.device()))?;
        }
        Ok::<(), tch::TchError>(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RadiT;

    #[test]
    fn weights_round_trip_with_their_config_and_mismatches_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let cfg = crate::model::RadiTConfig::preset("tiny").unwrap();
        tch::manual_seed(1);
        let vs = VarStore::new(tch::Device::Cpu);
        let _m = RadiT::new(&vs.root(), &cfg).unwrap();
        save_weights(&vs, &cfg, &path).unwrap();
        assert_eq!(
            read_weights_config(&path).unwrap(),
            Some(cfg.clone().into())
        );

        tch::manual_seed(2);
        let other = VarStore::new(tch::Device::Cpu);
        let _m2 = RadiT::new(&other.root(), &cfg).unwrap();
        load_weights(&other, &path).unwrap();
        let (a, b) = (vs.variables(), other.variables());
        for (name, t) in &a {
            assert!(t.equal(&b[name]), "{name} differs after the round trip");
        }

        let mut wider = cfg.clone();
        wider.hidden = 96;
        wider.heads = 4;
        let vs3 = VarStore::new(tch::Device::Cpu);
        let _m3 = RadiT::new(&vs3.root(), &wider).unwrap();
        let before = vs3.variables()["blocks.0.attn.qkv.weight"].copy();
        let err = load_weights(&vs3, &path).unwrap_err().to_string();
        assert!(
            err.contains("w.safetensors") && err.contains("shape"),
            "{err}"
        );
        assert!(
            before.equal(&vs3.variables()["blocks.0.attn.qkv.weight"]),
            "nothing may change"
        );

        let mut deeper = cfg.clone();
        deeper.depth = 3;
        let vs4 = VarStore::new(tch::Device::Cpu);
        let _m4 = RadiT::new(&vs4.root(), &deeper).unwrap();
        let err = load_weights(&vs4, &path).unwrap_err().to_string();
        assert!(
            err.contains("missing") && err.contains("blocks.2."),
            "{err}"
        );

        std::fs::write(&path, b"garbage").unwrap();
        assert!(load_weights(&vs, &path).is_err());
    }
}
