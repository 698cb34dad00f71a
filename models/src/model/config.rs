//! The RadiT architecture as one validated config, its presets, and what it costs (parameters, FLOPs, memory).

use serde::{Deserialize, Serialize};

use super::ModelError;

/// Classes per categorical metadata variable in the store's `labels` order (14 findings, race, sex, view, dataset),
/// class 0 = missing. Taken from the store schema so the model and the data cannot disagree.
pub fn schema_classes() -> Vec<i64> {
    radit_sharding::schema::Vocabulary::current()
        .classes
        .iter()
        .map(|c| c.len() as i64)
        .collect()
}

/// Preset names accepted by [`RadiTConfig::preset`].
pub const PRESETS: [&str; 5] = ["b-pixel", "b-latent", "xl-latent", "tiny", "tiny-latent"];

/// The architecture. Every open choice in the spec (../shared/design/model.md) is a field with the spec's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RadiTConfig {
    /// Image (or latent) channels in and out.
    pub in_channels: i64,
    /// Side of the square input in pixels (or latent cells).
    pub input_size: i64,
    pub patch_size: i64,
    pub hidden: i64,
    pub depth: i64,
    pub heads: i64,
    /// SwiGLU width; `None` = int(8 * hidden / 3) as the spec chooses.
    #[serde(default)]
    pub mlp_hidden: Option<i64>,
    #[serde(default = "default_true")]
    pub mlp_bias: bool,
    /// Classes per categorical variable, class 0 = missing.
    #[serde(default = "schema_classes")]
    pub classes: Vec<i64>,
    /// Factor on t before the timestep sinusoid (1 as in SiT; SD3 and Flux use 1000).
    #[serde(default = "default_time_scale")]
    pub time_scale: f64,
    /// How the timestep and metadata embeddings combine into c.
    #[serde(default)]
    pub conditioning: Conditioning,
}

/// How c is formed from the timestep embedding and the metadata embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Conditioning {
    /// c = t_emb + c_meta (the DiT pattern; the spec's reconstruction).
    #[default]
    Sum,
    /// c = (t_emb + c_meta) / sqrt(2), EDM2's magnitude-preserving sum with t = 0.5.
    MpSum,
}

fn default_true() -> bool {
    true
}

fn default_time_scale() -> f64 {
    1.0
}

impl RadiTConfig {
    fn sized(
        in_channels: i64,
        input_size: i64,
        patch_size: i64,
        hidden: i64,
        depth: i64,
        heads: i64,
    ) -> Self {
        Self {
            in_channels,
            input_size,
            patch_size,
            hidden,
            depth,
            heads,
            mlp_hidden: None,
            mlp_bias: true,
            classes: schema_classes(),
            time_scale: 1.0,
            conditioning: Conditioning::Sum,
        }
    }

    /// `b-pixel`, `b-latent`, `xl-latent` (the paper's models) and `tiny`, `tiny-latent` (for tests and the
    /// embedded default run).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let cfg = match name {
            "b-pixel" => Self::sized(1, 512, 16, 1024, 16, 16),
            "b-latent" => Self::sized(32, 64, 2, 1024, 16, 16),
            "xl-latent" => Self::sized(32, 64, 2, 1536, 32, 24),
            "tiny" => Self::sized(1, 16, 4, 64, 2, 4),
            "tiny-latent" => Self::sized(4, 8, 2, 48, 2, 3),
            other => {
                return Err(ModelError::UnknownPreset {
                    name: other.to_string(),
                    known: PRESETS.join(", "),
                });
            }
        };
        Ok(cfg)
    }

    /// Checks every field; the error names the field and why.
    pub fn validate(&self) -> Result<(), radit_protocol::ConfigError> {
        let bad = |field: &str, reason: String| {
            Err(radit_protocol::ConfigError {
                field: format!("model.{field}"),
                reason,
            })
        };
        for (field, v) in [
            ("in_channels", self.in_channels),
            ("input_size", self.input_size),
            ("patch_size", self.patch_size),
            ("hidden", self.hidden),
            ("depth", self.depth),
            ("heads", self.heads),
        ] {
            if v <= 0 {
                return bad(field, format!("must be positive, got {v}"));
            }
        }
        if self.input_size % self.patch_size != 0 {
            return bad(
                "patch_size",
                format!(
                    "{} does not divide input_size {}",
                    self.patch_size, self.input_size
                ),
            );
        }
        if self.hidden % self.heads != 0 {
            return bad(
                "heads",
                format!("{} does not divide hidden {}", self.heads, self.hidden),
            );
        }
        if self.head_dim() % 2 != 0 {
            return bad(
                "heads",
                format!("head dim {} must be even", self.head_dim()),
            );
        }
        // The 2-D position embedding splits D in half per axis and each half into sin|cos.
        if self.hidden % 4 != 0 {
            return bad(
                "hidden",
                format!("must be a multiple of 4, got {}", self.hidden),
            );
        }
        if let Some(h) = self.mlp_hidden
            && h <= 0
        {
            return bad("mlp_hidden", format!("must be positive, got {h}"));
        }
        if self.classes.is_empty() {
            return bad("classes", "needs at least one categorical variable".into());
        }
        if let Some((i, k)) = self.classes.iter().enumerate().find(|(_, k)| **k < 2) {
            return bad(
                &format!("classes[{i}]"),
                format!("needs the missing class and at least one value, got {k}"),
            );
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return bad(
                "time_scale",
                format!("must be positive, got {}", self.time_scale),
            );
        }
        Ok(())
    }

    pub fn grid(&self) -> i64 {
        self.input_size / self.patch_size
    }

    pub fn tokens(&self) -> i64 {
        self.grid() * self.grid()
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden / self.heads
    }

    pub fn mlp_width(&self) -> i64 {
        self.mlp_hidden.unwrap_or(self.hidden * 8 / 3)
    }

    /// Values per token after the final linear layer: p * p * C.
    pub fn patch_dim(&self) -> i64 {
        self.patch_size * self.patch_size * self.in_channels
    }

    /// Number of conditioning terms summed into c_meta (categoricals plus age).
    pub fn metadata_terms(&self) -> i64 {
        self.classes.len() as i64 + 1
    }

    /// Parameters by component, counted as the spec counts them (no positional embedding, no `age_null`).
    pub fn parameter_count(&self) -> ParameterCount {
        let d = self.hidden;
        let h = self.mlp_width();
        let mlp_bias = if self.mlp_bias { 1 } else { 0 };
        let linear = |i: i64, o: i64| i * o + o;
        let embedder = linear(256, d) + linear(d, d);
        let block = BlockCount {
            qkv: linear(d, 3 * d),
            proj: linear(d, d),
            qk_norm: 2 * self.head_dim(),
            mlp: 2 * (d * h + h * mlp_bias) + (h * d + d * mlp_bias),
            adaln: linear(d, 6 * d),
        };
        ParameterCount {
            patch_embed: self.in_channels * self.patch_size * self.patch_size * d + d,
            timestep: embedder,
            age: embedder,
            tables: self.classes.iter().sum::<i64>() * d,
            block,
            depth: self.depth,
            final_adaln: linear(d, 2 * d),
            final_linear: linear(d, self.patch_dim()),
        }
    }

    /// Forward FLOPs per token (2 per multiply-add; matmuls and attention only, adaLN is per sample).
    pub fn forward_flops_per_token(&self) -> f64 {
        let d = self.hidden as f64;
        let h = self.mlp_width() as f64;
        let l = self.tokens() as f64;
        let per_block = 2.0 * (4.0 * d * d + 3.0 * d * h) + 4.0 * l * d;
        let embed = 2.0 * (self.patch_dim() as f64) * d * 2.0;
        per_block * self.depth as f64 + embed
    }

    /// Training FLOPs per token: forward plus backward (twice the forward).
    pub fn training_flops_per_token(&self) -> f64 {
        3.0 * self.forward_flops_per_token()
    }

    /// Bytes of per-GPU training state (fp32 weights, grads, Adam m and v, EMA) when every rank holds everything
    /// (DDP) and when each of `world` ranks holds 1/world of it (FSDP / ZeRO-3), plus the transient bf16 copy of
    /// one gathered block (double-buffered for prefetch) that FSDP needs.
    pub fn memory_per_gpu(&self, world: i64) -> MemoryEstimate {
        let p = self.parameter_count().total() as f64;
        let state = 20.0 * p;
        let block = self.parameter_count().block.total() as f64;
        MemoryEstimate {
            ddp_bytes: state + 2.0 * p,
            fsdp_bytes: state / world.max(1) as f64 + 2.0 * 2.0 * block,
        }
    }
}

/// Parameters of one transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BlockCount {
    pub qkv: i64,
    pub proj: i64,
    pub qk_norm: i64,
    pub mlp: i64,
    pub adaln: i64,
}

impl BlockCount {
    pub fn total(&self) -> i64 {
        self.qkv + self.proj + self.qk_norm + self.mlp + self.adaln
    }
}

/// Parameters by component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParameterCount {
    pub patch_embed: i64,
    pub timestep: i64,
    pub age: i64,
    pub tables: i64,
    pub block: BlockCount,
    pub depth: i64,
    pub final_adaln: i64,
    pub final_linear: i64,
}

impl ParameterCount {
    pub fn total(&self) -> i64 {
        self.patch_embed
            + self.timestep
            + self.age
            + self.tables
            + self.block.total() * self.depth
            + self.final_adaln
            + self.final_linear
    }
}

/// Training-state bytes per GPU (activations not included; they depend on batch and checkpointing).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryEstimate {
    /// Replicated fp32 weights, grads, Adam m/v and EMA, plus bf16 weight and gradient copies.
    pub ddp_bytes: f64,
    /// The same state sharded over the world, plus two gathered bf16 blocks.
    pub fsdp_bytes: f64,
}

impl RadiTConfig {
    /// `radit model info`'s report for `preset`: sizes, FLOPs and training-state memory per GPU over `world`
    /// ranks, as JSON (for scripts) or lines.
    pub fn report(&self, preset: &str, world: i64, json: bool) -> String {
        use std::fmt::Write as _;
        let cfg = self;
        let count = cfg.parameter_count();
        let mem = cfg.memory_per_gpu(world);
        if json {
            return serde_json::json!({
                "preset": preset, "config": cfg, "parameters": count.total(), "breakdown": count,
                "tokens_per_sample": cfg.tokens(),
                "forward_flops_per_token": cfg.forward_flops_per_token(),
                "training_flops_per_token": cfg.training_flops_per_token(),
                "world": world, "ddp_bytes_per_gpu": mem.ddp_bytes, "fsdp_bytes_per_gpu": mem.fsdp_bytes,
            })
            .to_string();
        }
        let b = count.block;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "RadiT {preset}: {} parameters ({:.3}B)",
            count.total(),
            count.total() as f64 / 1e9
        );
        let _ = writeln!(
            o,
            "  input {}x{}x{}, patch {}, {} tokens; hidden {}, depth {}, heads {}, SwiGLU width {}",
            cfg.in_channels,
            cfg.input_size,
            cfg.input_size,
            cfg.patch_size,
            cfg.tokens(),
            cfg.hidden,
            cfg.depth,
            cfg.heads,
            cfg.mlp_width()
        );
        let _ = writeln!(
            o,
            "  per block {} (qkv {}, proj {}, qk-norm {}, SwiGLU {}, adaLN {}) x {}",
            b.total(),
            b.qkv,
            b.proj,
            b.qk_norm,
            b.mlp,
            b.adaln,
            count.depth
        );
        let _ = writeln!(
            o,
            "  patch embed {}, timestep MLP {}, age MLP {}, tables {}, final adaLN {}, final linear {}",
            count.patch_embed,
            count.timestep,
            count.age,
            count.tables,
            count.final_adaln,
            count.final_linear
        );
        let _ = writeln!(
            o,
            "FLOPs per token: {:.3} G forward, {:.3} G training (forward + backward)",
            cfg.forward_flops_per_token() / 1e9,
            cfg.training_flops_per_token() / 1e9
        );
        let _ = writeln!(
            o,
            "Training state per GPU (fp32 weights, grads, Adam m+v, EMA; activations not included):"
        );
        let _ = writeln!(o, "  DDP (replicated):      {:.2} GB", mem.ddp_bytes / 1e9);
        let _ = write!(
            o,
            "  FSDP over {world:>4} ranks: {:.2} GB",
            mem.fsdp_bytes / 1e9
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_count_what_the_spec_counts() {
        let count = |n: &str| RadiTConfig::preset(n).unwrap().parameter_count();
        assert_eq!(count("b-pixel").total(), 307_539_520);
        assert_eq!(count("b-latent").total(), 307_277_248);
        assert_eq!(count("xl-latent").total(), 1_370_482_816);
        // The spec's per-component figures (model.md section 4).
        let b = count("b-pixel");
        assert_eq!(b.block.total(), 18_889_172);
        assert_eq!(count("xl-latent").block.total(), 42_492_544);
        assert_eq!(b.tables, 61 * 1024);
        assert_eq!(RadiTConfig::preset("b-pixel").unwrap().mlp_width(), 2730);
        assert_eq!(RadiTConfig::preset("xl-latent").unwrap().mlp_width(), 4096);
    }

    #[test]
    fn flops_per_token_match_the_spec() {
        let xl = RadiTConfig::preset("xl-latent").unwrap();
        // 2.014 GF forward: the spec leaves out the patch embed and final linear (under 0.1%).
        let f = xl.forward_flops_per_token() / 1e9;
        assert!((f - 2.014).abs() < 0.003, "{f}");
        let b = RadiTConfig::preset("b-latent")
            .unwrap()
            .forward_flops_per_token()
            / 1e9;
        assert!((b - 0.470).abs() < 0.002, "{b}");
    }

    #[test]
    fn memory_matches_the_spec_table() {
        let m = RadiTConfig::preset("xl-latent").unwrap().memory_per_gpu(32);
        assert!((m.ddp_bytes / 1e9 - 30.1).abs() < 0.1, "{}", m.ddp_bytes);
        assert!(
            (m.fsdp_bytes / 1e9 - (0.86 + 0.17)).abs() < 0.02,
            "{}",
            m.fsdp_bytes
        );
    }

    #[test]
    fn invalid_fields_are_named() {
        let mut cfg = RadiTConfig::preset("tiny").unwrap();
        cfg.heads = 3;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("model.heads"), "{err}");
        let mut cfg = RadiTConfig::preset("tiny").unwrap();
        cfg.patch_size = 5;
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("model.patch_size")
        );
        let err = RadiTConfig::preset("huge").unwrap_err().to_string();
        assert!(err.contains("huge") && err.contains("xl-latent"), "{err}");
        for p in PRESETS {
            RadiTConfig::preset(p).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn the_config_round_trips_through_toml_and_rejects_unknown_fields() {
        let cfg = RadiTConfig::preset("b-latent").unwrap();
        let text = toml::to_string(&cfg).unwrap();
        let back: RadiTConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, cfg);
        let err = toml::from_str::<RadiTConfig>(&format!("{text}\nwidth = 3\n")).unwrap_err();
        assert!(err.to_string().contains("width"), "{err}");
    }
}
