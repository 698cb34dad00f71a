//! The RadiT model: patch embedding + positions, conditioning, DiT blocks, final layer, unpatchify.

use tch::{Kind, Tensor, nn};

use super::layers::{
    Block, Conditioning, FinalLayer, MetadataEmbedder, PatchEmbed, TimestepEmbedder,
    position_embedding,
};
use super::{ConditioningMode, ModelError, RadiTConfig};
use crate::precision::Precision;

/// Named intermediates of one forward pass (`patch_embed`, `c`, `block.{i}`, `velocity`), for parity checks.
pub type Trace = Vec<(String, Tensor)>;

/// RadiT. Build it on a `VarStore` path; its variables are named as in the PyTorch twin.
///
/// ```no_run
/// use radit_models::model::{RadiT, RadiTConfig};
/// let vs = tch::nn::VarStore::new(tch::Device::Cpu);
/// let model = RadiT::new(&vs.root(), &RadiTConfig::preset("tiny")?)?;
/// # Ok::<(), radit_models::model::ModelError>(())
/// ```
#[derive(Debug)]
pub struct RadiT {
    cfg: RadiTConfig,
    x_embedder: PatchEmbed,
    pos_embed: Tensor,
    t_embedder: TimestepEmbedder,
    y_embedder: MetadataEmbedder,
    blocks: Vec<Block>,
    final_layer: FinalLayer,
    precision: Precision,
}

impl RadiT {
    /// Creates the variables under `p` with DiT's initialisation (drawn from libtorch's global generator, so
    /// `tch::manual_seed` makes it reproducible). The output is exactly zero until the zero-initialised layers move.
    /// What the engine builds its model with: a RadiT of `cfg`, as a block model.
    pub fn builder(
        cfg: &RadiTConfig,
    ) -> impl FnOnce(&nn::Path) -> Result<Box<dyn crate::block::BlockModel>, ModelError> + '_ {
        move |p| Ok(Box::new(RadiT::new(p, cfg)?) as Box<dyn crate::block::BlockModel>)
    }

    pub fn new(p: &nn::Path, cfg: &RadiTConfig) -> Result<Self, ModelError> {
        cfg.validate()?;
        let d = cfg.hidden;
        Ok(Self {
            cfg: cfg.clone(),
            x_embedder: PatchEmbed::new(
                p / "x_embedder" / "proj",
                cfg.in_channels,
                d,
                cfg.patch_size,
            ),
            pos_embed: position_embedding(d, cfg.grid())
                .unsqueeze(0)
                .to_device(p.device()),
            t_embedder: TimestepEmbedder::new(p / "t_embedder", d),
            y_embedder: MetadataEmbedder::new(p / "y_embedder", &cfg.classes, d),
            blocks: (0..cfg.depth)
                .map(|i| Block::new(p / "blocks" / i, cfg))
                .collect(),
            final_layer: FinalLayer::new(p / "final_layer", d, cfg.patch_dim()),
            precision: Precision::Fp32,
        })
    }

    pub fn config(&self) -> &RadiTConfig {
        &self.cfg
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// The transformer blocks, for engines that schedule them one at a time.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Checks shapes, kinds and label ranges of one batch: x [B, C, S, S] float, t [B], labels [B, V] integer
    /// with class ids below each variable's class count, age [B].
    pub fn check_inputs(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: &Tensor,
        age: &Tensor,
    ) -> Result<(), ModelError> {
        let c = &self.cfg;
        let bad = |input: &'static str, reason: String| Err(ModelError::BadInput { input, reason });
        let want = [c.in_channels, c.input_size, c.input_size];
        let size = x.size();
        if size.len() != 4 || size[1..] != want {
            return bad(
                "x",
                format!(
                    "shape {size:?}, expected [B, {}, {}, {}]",
                    want[0], want[1], want[2]
                ),
            );
        }
        if !x.is_floating_point() {
            return bad("x", format!("kind {:?}, expected a float tensor", x.kind()));
        }
        check_conditions(size[0], t, labels, age, &c.classes)
    }

    /// c = t_emb(t * time_scale) + c_meta (or their magnitude-preserving sum), [B, D] fp32.
    pub fn condition(&self, t: &Tensor, labels: &Tensor, age: &Tensor) -> Conditioning {
        let kind = self.precision.compute_kind();
        let te = self
            .t_embedder
            .forward(&(t.to_kind(Kind::Float) * self.cfg.time_scale), kind);
        let ye = self
            .y_embedder
            .forward(&labels.to_kind(Kind::Int64), age, kind);
        Conditioning(match self.cfg.conditioning {
            ConditioningMode::Sum => te + ye,
            ConditioningMode::MpSum => (te + ye) / std::f64::consts::SQRT_2,
        })
    }

    /// Patch embedding plus positions: [B, C, S, S] -> [B, N, D] fp32.
    pub fn embed(&self, x: &Tensor) -> Tensor {
        let kind = self.precision.compute_kind();
        self.x_embedder.forward(x, kind).to_kind(Kind::Float) + &self.pos_embed
    }

    /// Final layer and unpatchify: [B, N, D] -> velocity [B, C, S, S] fp32.
    pub fn head(&self, h: &Tensor, c: &Conditioning) -> Tensor {
        let (p, ch, g) = (self.cfg.patch_size, self.cfg.in_channels, self.cfg.grid());
        let y = self
            .final_layer
            .forward(h, c, self.precision.compute_kind()); // [B, N, p*p*C]
        let b = y.size()[0];
        // Within a token the channels run (p_row, p_col, C); the conv weight flattens as (C, p_row, p_col).
        y.view([b, g, g, p, p, ch]) // [B, h, w, p, q, C]
            .permute([0, 5, 1, 3, 2, 4]) // [B, C, h, p, w, q]
            .reshape([b, ch, g * p, g * p])
    }

    /// The predicted velocity v(x, t, metadata): [B, C, S, S] fp32.
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: &Tensor,
        age: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.run(x, t, labels, age, None)
    }

    /// As [`RadiT::forward`], recording every intermediate into `trace`.
    pub fn forward_traced(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: &Tensor,
        age: &Tensor,
        trace: &mut Trace,
    ) -> Result<Tensor, ModelError> {
        self.run(x, t, labels, age, Some(trace))
    }

    fn run(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: &Tensor,
        age: &Tensor,
        mut trace: Option<&mut Trace>,
    ) -> Result<Tensor, ModelError> {
        self.check_inputs(x, t, labels, age)?;
        let kind = self.precision.compute_kind();
        let mut record = |name: String, v: &Tensor| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.push((name, v.shallow_clone()));
            }
        };
        let mut h = self.embed(x);
        let c = self.condition(t, labels, age);
        record("patch_embed".into(), &h);
        record("c".into(), &c.0);
        for (i, blk) in self.blocks.iter().enumerate() {
            h = blk.forward(&h, &c, kind);
            record(format!("block.{i}"), &h);
        }
        let v = self.head(&h, &c);
        record("velocity".into(), &v);
        Ok(v)
    }
}

/// RadiT as the engine schedules it: `blocks.{i}.*` are block i; the final layer is the head, the patch embedding
/// the input, the time and metadata embedders the conditioning.
/// Checks the conditioning of a batch of `b`: t [b], age [b], labels [b, V] integer class ids below each
/// variable's class count. Shared by every model that takes the 19 variables.
pub(crate) fn check_conditions(
    b: i64,
    t: &Tensor,
    labels: &Tensor,
    age: &Tensor,
    classes: &[i64],
) -> Result<(), ModelError> {
    let bad = |input: &'static str, reason: String| Err(ModelError::BadInput { input, reason });
    if t.size() != [b] {
        return bad("t", format!("shape {:?}, expected [{b}]", t.size()));
    }
    if age.size() != [b] {
        return bad("age", format!("shape {:?}, expected [{b}]", age.size()));
    }
    let v = classes.len() as i64;
    if labels.size() != [b, v] {
        return bad(
            "labels",
            format!("shape {:?}, expected [{b}, {v}]", labels.size()),
        );
    }
    if labels.is_floating_point() {
        return bad(
            "labels",
            format!("kind {:?}, expected integer class ids", labels.kind()),
        );
    }
    if b > 0 {
        let labels = labels.to_kind(Kind::Int64).to_device(tch::Device::Cpu);
        let max = Vec::<i64>::try_from(labels.amax([0], false))?;
        let min = i64::try_from(labels.min())?;
        if min < 0 {
            return bad("labels", format!("negative class id {min}"));
        }
        if let Some((i, (m, k))) = max
            .iter()
            .zip(classes)
            .enumerate()
            .find(|(_, (m, k))| **m >= **k)
        {
            return bad(
                "labels",
                format!("column {i} has class {m} but only {k} classes"),
            );
        }
    }
    Ok(())
}

impl crate::block::BlockModel for RadiT {
    fn depth(&self) -> usize {
        self.blocks.len()
    }

    fn block_of(&self, name: &str) -> Option<usize> {
        let rest = name.strip_prefix("blocks.")?;
        rest.split('.').next()?.parse().ok()
    }

    fn rest_parts(&self) -> crate::block::RestParts {
        crate::block::RestParts {
            head: &["final_layer."],
            input: &["x_embedder."],
            conditioning: &["t_embedder.", "y_embedder."],
        }
    }

    fn check_inputs(&self, i: &crate::block::ModelInputs) -> Result<(), ModelError> {
        RadiT::check_inputs(self, i.x, i.t, i.labels, i.age)
    }

    fn embed(&self, x: &Tensor) -> Tensor {
        RadiT::embed(self, x)
    }

    fn condition(&self, i: &crate::block::ModelInputs) -> Tensor {
        RadiT::condition(self, i.t, i.labels, i.age).0
    }

    fn block(&self, i: usize, h: &Tensor, c: &Tensor, kind: Kind) -> Tensor {
        self.blocks[i].forward(h, &Conditioning(c.shallow_clone()), kind)
    }

    fn head(&self, h: &Tensor, c: &Tensor) -> Tensor {
        RadiT::head(self, h, &Conditioning(c.shallow_clone()))
    }

    fn set_precision(&mut self, precision: Precision) {
        RadiT::set_precision(self, precision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::{position_embedding, timestep_sinusoid};

    fn close(got: &[f32], want: &[f32], tol: f32) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= tol, "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn spot_values_of_the_spec() {
        let pos = position_embedding(64, 8);
        let token5 = Vec::<f32>::try_from(pos.get(5)).unwrap();
        close(&token5[..3], &[-0.95892, 0.32394, 0.99995], 1e-5);
        // Token 5 is row 0: the row half is sin(0) = 0 then cos(0) = 1.
        assert!(token5[32..48].iter().all(|v| *v == 0.0));
        assert!(token5[48..].iter().all(|v| *v == 1.0));
        let s =
            Vec::<f32>::try_from(timestep_sinusoid(&Tensor::from_slice(&[0.5f32])).get(0)).unwrap();
        close(&s[0..3], &[0.87758, 0.89369, 0.90772], 1e-5);
        close(&s[128..131], &[0.47943, 0.44868, 0.41958], 1e-5);
    }

    fn batch(cfg: &RadiTConfig, b: i64) -> (Tensor, Tensor, Tensor, Tensor) {
        let x = Tensor::randn(
            [b, cfg.in_channels, cfg.input_size, cfg.input_size],
            tch::kind::FLOAT_CPU,
        );
        let t = Tensor::rand([b], tch::kind::FLOAT_CPU);
        let labels = Tensor::zeros(
            [b, cfg.classes.len() as i64],
            (Kind::Uint8, tch::Device::Cpu),
        );
        let age = Tensor::from_slice(&vec![0.5f32; b as usize]);
        (x, t, labels, age)
    }

    #[test]
    fn the_output_is_exactly_zero_at_initialisation_and_parameters_match_the_formula() {
        tch::manual_seed(0);
        let cfg = RadiTConfig::preset("tiny").unwrap();
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = RadiT::new(&vs.root(), &cfg).unwrap();
        let (x, t, labels, age) = batch(&cfg, 2);
        let v = model.forward(&x, &t, &labels, &age).unwrap();
        assert_eq!(v.size(), x.size());
        assert_eq!(v.abs().max().double_value(&[]), 0.0);
        let counted: i64 = vs
            .variables()
            .iter()
            .filter(|(n, _)| n.as_str() != "y_embedder.age_null")
            .map(|(_, t)| t.numel() as i64)
            .sum();
        assert_eq!(counted, cfg.parameter_count().total());
    }

    #[test]
    fn the_magnitude_preserving_conditioning_scales_the_sum() {
        let cfg = RadiTConfig::preset("tiny").unwrap();
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let mut model = RadiT::new(&vs.root(), &cfg).unwrap();
        let (_, t, labels, age) = batch(&cfg, 2);
        let sum = model.condition(&t, &labels, &age).0;
        model.cfg.conditioning = ConditioningMode::MpSum;
        let mp = model.condition(&t, &labels, &age).0;
        let err = (sum / std::f64::consts::SQRT_2 - mp)
            .abs()
            .max()
            .double_value(&[]);
        assert!(err < 1e-7, "{err}");
    }

    #[test]
    fn bad_inputs_are_named() {
        let cfg = RadiTConfig::preset("tiny").unwrap();
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = RadiT::new(&vs.root(), &cfg).unwrap();
        let (x, t, labels, age) = batch(&cfg, 2);
        let err = model
            .forward(&x.narrow(2, 0, 8), &t, &labels, &age)
            .unwrap_err();
        assert!(err.to_string().contains("`x`"), "{err}");
        let wrong = labels.shallow_clone().to_kind(Kind::Int64);
        let _ = wrong.get(1).get(17).fill_(8);
        let err = model.forward(&x, &t, &wrong, &age).unwrap_err().to_string();
        assert!(err.contains("column 17 has class 8"), "{err}");
        let err = model
            .forward(&x, &t.narrow(0, 0, 1), &labels, &age)
            .unwrap_err();
        assert!(err.to_string().contains("`t`"), "{err}");
    }
}
