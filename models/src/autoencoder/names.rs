//! The two namings users have of the same autoencoder weights: the original release's (`encoder.down.1.block.0`,
//! attention as 1x1 convolutions `mid.attn_1.q`), which radit's variables use, and diffusers'
//! (`encoder.down_blocks.1.resnets.0`, `conv_shortcut`, `mid_block.attentions.0.to_q` as linear weights, and decoder
//! levels numbered from the lowest resolution). A file in either loads; a name that neither explains is left as it
//! is, so strict loading names it as unexpected.

use std::collections::BTreeMap;
use std::path::Path;

use tch::Tensor;

use super::AeConfig;
use crate::error::ModelError;

/// Whether a file's names are diffusers'.
fn is_diffusers(names: &BTreeMap<String, Tensor>) -> bool {
    names.keys().any(|n| {
        n.contains(".down_blocks.") || n.contains(".up_blocks.") || n.contains(".mid_block.")
    })
}

/// A ResNet block's own names: diffusers calls the 1x1 shortcut `conv_shortcut`.
fn resnet_part(rest: &str) -> String {
    rest.replace("conv_shortcut", "nin_shortcut")
}

/// `rest` of a `mid_block.` name: (original name, whether the tensor is a linear weight to reshape to 1x1).
fn mid_part(rest: &str) -> Option<(String, bool)> {
    if let Some(r) = rest.strip_prefix("resnets.0.") {
        return Some((format!("mid.block_1.{}", resnet_part(r)), false));
    }
    if let Some(r) = rest.strip_prefix("resnets.1.") {
        return Some((format!("mid.block_2.{}", resnet_part(r)), false));
    }
    let r = rest.strip_prefix("attentions.0.")?;
    let (layer, param) = r.rsplit_once('.')?;
    let to = match layer {
        "group_norm" => "norm",
        "to_q" => "q",
        "to_k" => "k",
        "to_v" => "v",
        "to_out.0" => "proj_out",
        _ => return None,
    };
    Some((
        format!("mid.attn_1.{to}.{param}"),
        to != "norm" && param == "weight",
    ))
}

/// The original name of a diffusers name (and whether its tensor is a linear weight), `None` if it is not one.
fn original(name: &str, levels: usize) -> Option<(String, bool)> {
    let (side, rest) = name.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let (inner, linear) = if let Some(r) = rest.strip_prefix("mid_block.") {
        mid_part(r)?
    } else if let Some(r) = rest.strip_prefix("conv_norm_out.") {
        (format!("norm_out.{r}"), false)
    } else if let Some(r) = rest
        .strip_prefix("down_blocks.")
        .or_else(|| rest.strip_prefix("up_blocks."))
    {
        let (index, r) = r.split_once('.')?;
        let index: usize = index.parse().ok()?;
        // diffusers numbers the decoder's levels from the lowest resolution, the original from the highest.
        let level = if side == "decoder" {
            levels.checked_sub(index + 1)?
        } else {
            index
        };
        let (kind, resample) = if side == "encoder" {
            ("down", "downsample")
        } else {
            ("up", "upsample")
        };
        if let Some(r) = r.strip_prefix("resnets.") {
            let (block, r) = r.split_once('.')?;
            (
                format!("{kind}.{level}.block.{block}.{}", resnet_part(r)),
                false,
            )
        } else {
            let r = r
                .strip_prefix("downsamplers.0.conv.")
                .or_else(|| r.strip_prefix("upsamplers.0.conv."))?;
            (format!("{kind}.{level}.{resample}.conv.{r}"), false)
        }
    } else {
        return None;
    };
    Some((format!("{side}.{inner}"), linear))
}

/// `tensors` under radit's (the original) names, whichever naming the file at `path` has. Linear attention weights
/// become 1x1 convolution weights; the quant convolutions may sit at the top level or inside the encoder and
/// decoder. A name no rule explains is kept as it is.
pub fn to_original(
    tensors: BTreeMap<String, Tensor>,
    config: &AeConfig,
    path: &Path,
) -> Result<BTreeMap<String, Tensor>, ModelError> {
    let diffusers = is_diffusers(&tensors);
    let levels = config.ch_mult.len();
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        let (renamed, t) = match () {
            _ if name.starts_with("encoder.quant_conv.") => {
                (name["encoder.".len()..].to_string(), t)
            }
            _ if name.starts_with("decoder.post_quant_conv.") => {
                (name["decoder.".len()..].to_string(), t)
            }
            _ if diffusers => match original(&name, levels) {
                Some((to, true)) if t.dim() == 2 => {
                    let size = t.size();
                    (to, t.reshape([size[0], size[1], 1, 1]))
                }
                Some((to, _)) => (to, t),
                None => (name.clone(), t),
            },
            _ => (name.clone(), t),
        };
        if out.insert(renamed.clone(), t).is_some() {
            return Err(ModelError::BadWeights {
                path: path.display().to_string(),
                reason: format!("two tensors are {renamed} (the second named {name})"),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_names_map_to_the_original_ones() {
        let cases = [
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
                "encoder.down.0.downsample.conv.bias",
            ),
            (
                "encoder.mid_block.resnets.1.norm2.weight",
                "encoder.mid.block_2.norm2.weight",
            ),
            (
                "decoder.mid_block.attentions.0.to_out.0.weight",
                "decoder.mid.attn_1.proj_out.weight",
            ),
            (
                "decoder.mid_block.attentions.0.group_norm.bias",
                "decoder.mid.attn_1.norm.bias",
            ),
            (
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                "decoder.up.3.block.2.conv1.weight",
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                "decoder.up.1.upsample.conv.weight",
            ),
            ("decoder.conv_norm_out.weight", "decoder.norm_out.weight"),
        ];
        for (from, to) in cases {
            assert_eq!(
                original(from, 4).map(|(n, _)| n).as_deref(),
                Some(to),
                "{from}"
            );
        }
        assert_eq!(
            original("encoder.mid_block.attentions.0.to_q.weight", 4),
            Some(("encoder.mid.attn_1.q.weight".into(), true))
        );
        assert_eq!(
            original("decoder.up_blocks.4.resnets.0.conv1.weight", 4),
            None
        );
        assert_eq!(original("quant_conv.weight", 4), None);
    }
}
