//! The RadUNet network: EDM2's U-Net with the raw output as the rectified-flow velocity (no EDM preconditioning),
//! t in [0, 1] as the noise label, and RadiT's 19 metadata variables through magnitude-preserving layers.

use tch::{Kind, Tensor, nn};

use super::config::{
    ATTN_BALANCE, BlockPlan, CLIP_ACT, CONCAT_BALANCE, Flavor, LABEL_BALANCE, RES_BALANCE,
    UNetConfig,
};
use super::dropout;
use super::mp::{MpConv, MpFourier, mp_cat, mp_silu, mp_sum, normalize, normalize_over, resample};
use crate::block::ModelInputs;
use crate::error::ModelError;
use crate::precision::Precision;
use crate::staged::{StageInputs, StagedModel, run_stages};

/// Whether the parameter `name` is `path` itself or lies under it (`enc.8x8_block0.conv_res0.weight` under
/// `enc.8x8_block0`, not under `enc.8x8_block`).
pub(crate) fn under(name: &str, path: &str) -> bool {
    name.strip_prefix(path)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// An encoder or decoder block with optional self-attention.
#[derive(Debug)]
pub struct UNetBlock {
    plan: BlockPlan,
    /// Its place in the network, which keys its dropout mask.
    index: u64,
    dropout: f64,
    heads: i64,
    /// The embedding's gain and projection (EDM2's `emb_gain`, `emb_linear`); none in RadVAE's blocks.
    emb: Option<(Tensor, MpConv)>,
    conv_res0: MpConv,
    conv_res1: MpConv,
    conv_skip: Option<MpConv>,
    attn: Option<(MpConv, MpConv)>,
}

impl UNetBlock {
    /// `cemb`: the embedding's width, or `None` for a block without one (RadVAE's).
    pub(crate) fn new(
        p: &nn::Path,
        plan: &BlockPlan,
        index: u64,
        channels_per_head: i64,
        dropout: f64,
        cemb: Option<i64>,
    ) -> Self {
        let (cin, cout) = (plan.cin, plan.cout);
        let res0_in = if plan.flavor == Flavor::Enc {
            cout
        } else {
            cin
        };
        Self {
            heads: if plan.attention {
                cout / channels_per_head
            } else {
                0
            },
            emb: cemb.map(|cemb| {
                (
                    p.zeros("emb_gain", &[]),
                    MpConv::new(&(p / "emb_linear"), cemb, cout, 0),
                )
            }),
            conv_res0: MpConv::new(&(p / "conv_res0"), res0_in, cout, 3),
            conv_res1: MpConv::new(&(p / "conv_res1"), cout, cout, 3),
            conv_skip: (cin != cout).then(|| MpConv::new(&(p / "conv_skip"), cin, cout, 1)),
            attn: plan.attention.then(|| {
                (
                    MpConv::new(&(p / "attn_qkv"), cout, 3 * cout, 1),
                    MpConv::new(&(p / "attn_proj"), cout, cout, 1),
                )
            }),
            plan: plan.clone(),
            index,
            dropout,
        }
    }

    /// Its parameter path (`enc.16x16_block0`).
    pub(crate) fn name(&self) -> &str {
        &self.plan.name
    }

    pub(crate) fn convs(&self) -> impl Iterator<Item = &MpConv> {
        [&self.conv_res0, &self.conv_res1]
            .into_iter()
            .chain(self.emb.as_ref().map(|(_, linear)| linear))
            .chain(self.conv_skip.as_ref())
            .chain(self.attn.iter().flat_map(|(q, p)| [q, p]))
    }

    /// The block; `keys` (one per sample) turns on the residual branch's dropout, keyed by sample and block.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        emb: Option<&Tensor>,
        keys: Option<&Tensor>,
    ) -> Tensor {
        let mut x = resample(x, self.plan.resample);
        if self.plan.flavor == Flavor::Enc {
            if let Some(skip) = &self.conv_skip {
                x = skip.forward(&x);
            }
            x = normalize_over(&x, &[1]);
        }
        let y = self.conv_res0.forward(&mp_silu(&x));
        let y = match (&self.emb, emb) {
            (Some((gain, linear)), Some(emb)) => {
                let c = linear.forward_gain(emb, gain) + 1.0;
                y * c.unsqueeze(2).unsqueeze(3).to_kind(x.kind())
            }
            _ => y,
        };
        let mut y = mp_silu(&y);
        if let Some(keys) = keys.filter(|_| self.dropout > 0.0) {
            y = dropout::apply(&y, self.dropout, keys, self.index);
        }
        let y = self.conv_res1.forward(&y);
        if self.plan.flavor == Flavor::Dec
            && let Some(skip) = &self.conv_skip
        {
            x = skip.forward(&x);
        }
        let mut x = mp_sum(&x, &y, RES_BALANCE);
        if let Some((qkv, proj)) = &self.attn {
            let size = x.size();
            let (n, c, h, w) = (size[0], size[1], size[2], size[3]);
            let y = qkv.forward(&x).reshape([n, self.heads, -1, 3, h * w]);
            let y = normalize_over(&y, &[2]);
            let parts = y.unbind(3);
            let (q, k, v) = (&parts[0], &parts[1], &parts[2]);
            let scale = 1.0 / (q.size()[2] as f64).sqrt();
            let weights = Tensor::einsum("nhcq,nhck->nhqk", &[q, &(k * scale)], None::<i64>)
                .softmax(3, Kind::Float)
                .to_kind(q.kind());
            let y = Tensor::einsum("nhqk,nhck->nhcq", &[&weights, v], None::<i64>);
            let y = proj.forward(&y.reshape([n, c, h, w]));
            x = mp_sum(&x, &y, ATTN_BALANCE);
        }
        x.clamp(-CLIP_ACT, CLIP_ACT)
    }
}

/// RadiT's 19-variable metadata embedding rebuilt with magnitude-preserving layers: each variable's one-hot (√K
/// scaled, class 0 = missing) through its own MPConv, age through MPFourier then an MPConv (a learned unit-RMS null
/// vector when missing), summed and divided by √19.
#[derive(Debug)]
pub struct MetadataEmbedding {
    tables: Vec<MpConv>,
    age_fourier: MpFourier,
    age_linear: MpConv,
    age_null: MpConv,
    classes: Vec<i64>,
}

impl MetadataEmbedding {
    fn new(p: &nn::Path, classes: &[i64], cfourier: i64, cemb: i64) -> Self {
        let t = p / "tables";
        Self {
            tables: classes
                .iter()
                .enumerate()
                .map(|(i, &k)| MpConv::new(&(&t / i), k, cemb, 0))
                .collect(),
            age_fourier: MpFourier::new(&(p / "age_fourier"), cfourier),
            age_linear: MpConv::new(&(p / "age_linear"), cfourier, cemb, 0),
            // One unit-RMS vector [1, cemb] (a per-element normalisation over a fan-in of 1 would leave it only
            // the signs of its elements to learn).
            age_null: MpConv::new(&(p / "age_null"), cemb, 1, 0),
            classes: classes.to_vec(),
        }
    }

    fn forward(&self, labels: &Tensor, age: &Tensor) -> Tensor {
        let n = labels.size()[0];
        let mut sum: Option<Tensor> = None;
        let mut add = |e: Tensor| {
            sum = Some(match sum.take() {
                Some(s) => s + e,
                None => e,
            })
        };
        for (i, (table, &k)) in self.tables.iter().zip(&self.classes).enumerate() {
            let one_hot =
                labels.select(1, i as i64).one_hot(k).to_kind(Kind::Float) * (k as f64).sqrt();
            add(table.forward(&one_hot));
        }
        let age = age.to_kind(Kind::Float);
        let known = age.isfinite().unsqueeze(1);
        let with_age = self
            .age_linear
            .forward(&self.age_fourier.forward(&age.nan_to_num(0.0, None, None)));
        let null = normalize(&self.age_null.weight).expand([n, -1], false);
        add(with_age.where_self(&known, &null));
        let count = self.tables.len() as f64 + 1.0;
        sum.unwrap_or_else(|| null.zeros_like()) / count.sqrt()
    }

    fn convs(&self) -> impl Iterator<Item = &MpConv> {
        self.tables.iter().chain([&self.age_linear, &self.age_null])
    }
}

/// The U-Net. Parameter paths follow EDM2's (`enc.16x16_block0.conv_res0.weight`, `emb_noise.weight`,
/// `out_gain`), with the metadata embedding under `emb_label`.
#[derive(Debug)]
pub struct RadUNet {
    cfg: UNetConfig,
    emb_fourier: MpFourier,
    emb_noise: MpConv,
    emb_label: MetadataEmbedding,
    input_conv: MpConv,
    encoder: Vec<UNetBlock>,
    decoder: Vec<UNetBlock>,
    out_conv: MpConv,
    out_gain: Tensor,
    /// For each decoder block fed a skip connection, the stage value it reads (see [`StagedModel`]).
    skip_of: Vec<Option<usize>>,
    /// Parameter path prefixes and the stage that uses them.
    stage_prefixes: Vec<(String, usize)>,
    precision: Precision,
}

impl RadUNet {
    pub fn new(p: &nn::Path, cfg: &UNetConfig) -> Result<Self, ModelError> {
        cfg.validate()?;
        let plan = cfg.plan();
        let at = |name: &str| name.split('.').fold(p.clone(), |path, part| &path / part);
        let (name, cin, cout) = &plan.input_conv;
        // Stage values: 0 the embedding, 1 the input convolution's output, then one per block in order; the
        // encoder's outputs (1 ..= encoder) are the skips, which the decoder takes from the last.
        let (e, d) = (plan.encoder.len(), plan.decoder.len());
        let mut skips: Vec<usize> = (1..=e + 1).collect();
        let skip_of = plan
            .decoder
            .iter()
            .map(|b| if b.takes_skip { skips.pop() } else { None })
            .collect();
        let mut stage_prefixes: Vec<(String, usize)> =
            ["emb_fourier", "emb_noise", "emb_label", name]
                .iter()
                .map(|n| (n.to_string(), 0))
                .collect();
        for (i, b) in plan.encoder.iter().chain(&plan.decoder).enumerate() {
            stage_prefixes.push((b.name.clone(), i + 1));
        }
        for n in ["out_conv", "out_gain"] {
            stage_prefixes.push((n.to_string(), e + d + 1));
        }
        Ok(Self {
            skip_of,
            stage_prefixes,
            precision: Precision::Fp32,
            emb_fourier: MpFourier::new(&(p / "emb_fourier"), plan.cnoise),
            emb_noise: MpConv::new(&(p / "emb_noise"), plan.cnoise, plan.cemb, 0),
            emb_label: MetadataEmbedding::new(
                &(p / "emb_label"),
                &cfg.classes,
                plan.cnoise,
                plan.cemb,
            ),
            input_conv: MpConv::new(&at(name), *cin, *cout, 3),
            encoder: plan
                .encoder
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    UNetBlock::new(
                        &at(&b.name),
                        b,
                        i as u64,
                        cfg.channels_per_head,
                        cfg.dropout,
                        Some(plan.cemb),
                    )
                })
                .collect(),
            decoder: plan
                .decoder
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let index = (plan.encoder.len() + i) as u64;
                    UNetBlock::new(
                        &at(&b.name),
                        b,
                        index,
                        cfg.channels_per_head,
                        cfg.dropout,
                        Some(plan.cemb),
                    )
                })
                .collect(),
            out_conv: MpConv::new(&(p / "out_conv"), plan.out_cin, cfg.img_channels, 3),
            // Zero: the output is exactly 0 at initialisation, as DiT's zero-initialised head.
            out_gain: p.zeros("out_gain", &[]),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// Checks the inputs' shapes and kinds against the model, naming the one that is wrong.
    pub fn check_inputs(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: &Tensor,
        age: &Tensor,
    ) -> Result<(), ModelError> {
        let c = &self.cfg;
        let size = x.size();
        let want = [c.img_channels, c.img_resolution, c.img_resolution];
        if size.len() != 4 || size[1..] != want || size[0] == 0 || !x.is_floating_point() {
            return Err(ModelError::BadInput {
                input: "x",
                reason: format!(
                    "{:?} {size:?}; expected float [batch, {}, {}, {}]",
                    x.kind(),
                    want[0],
                    want[1],
                    want[2]
                ),
            });
        }
        crate::model::check_conditions(size[0], t, labels, age, &c.classes)
    }

    /// The velocity v(x, t, metadata): [B, C, S, S] in x's kind, without dropout (sampling, evaluation).
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: &Tensor,
        age: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.run(x, t, labels, age, None)
    }

    /// The velocity in training: dropout (where the config has it) keyed per sample by `keys` [B] (see
    /// [`dropout::keys`]: seed, step and each row's global sample index), so a sample's masks are the same on
    /// any world size.
    pub fn forward_train(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: &Tensor,
        age: &Tensor,
        keys: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let b = x.size().first().copied().unwrap_or(0);
        if keys.size() != [b] || keys.kind() != Kind::Int64 {
            return Err(ModelError::BadInput {
                input: "keys",
                reason: format!("{:?} {:?}; expected int64 [{b}]", keys.kind(), keys.size()),
            });
        }
        self.run(x, t, labels, age, Some(keys))
    }

    fn run(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: &Tensor,
        age: &Tensor,
        keys: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let keys = keys.map(|k| k.to_device(x.device()));
        let at = StageInputs {
            inputs: ModelInputs { x, t, labels, age },
            keys: keys.as_ref(),
        };
        run_stages(self, &at)?
            .into_iter()
            .next()
            .ok_or_else(|| ModelError::BadInput {
                input: "x",
                reason: "the U-Net made no output".into(),
            })
    }

    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// Forced weight normalisation: every MPConv weight back to unit RMS per output channel. Called after every
    /// optimiser step in training.
    pub fn force_normalize(&self) {
        let blocks = self
            .encoder
            .iter()
            .chain(&self.decoder)
            .flat_map(UNetBlock::convs);
        for conv in [&self.emb_noise, &self.input_conv, &self.out_conv]
            .into_iter()
            .chain(self.emb_label.convs())
            .chain(blocks)
        {
            conv.force_normalize();
        }
    }
}

impl StagedModel for RadUNet {
    fn groups(&self) -> Vec<String> {
        std::iter::once("rest".to_string())
            .chain(
                self.encoder
                    .iter()
                    .chain(&self.decoder)
                    .map(|b| b.plan.name.clone()),
            )
            .collect()
    }

    /// The embeddings, the input and output convolutions in `rest`; each block its own group.
    fn group_of(&self, name: &str) -> usize {
        match self.stage_of(name) {
            s if s == self.stages() - 1 => 0,
            s => s,
        }
    }

    /// Stage 0: the embedding and the input convolution; then one stage per encoder and decoder block; last, the
    /// output convolution.
    fn stages(&self) -> usize {
        self.encoder.len() + self.decoder.len() + 2
    }

    fn stage_of(&self, name: &str) -> usize {
        self.stage_prefixes
            .iter()
            .find(|(p, _)| under(name, p))
            .map_or(0, |(_, s)| *s)
    }

    fn check_inputs(&self, i: &ModelInputs) -> Result<(), ModelError> {
        RadUNet::check_inputs(self, i.x, i.t, i.labels, i.age)
    }

    fn stage(
        &self,
        i: usize,
        values: &[Tensor],
        at: &StageInputs,
    ) -> Result<Vec<Tensor>, ModelError> {
        let (e, d) = (self.encoder.len(), self.decoder.len());
        let missing = || ModelError::BadInput {
            input: "x",
            reason: format!("stage {i} ran before the embedding"),
        };
        if i == 0 {
            let inp = &at.inputs;
            let emb = self.emb_noise.forward(&self.emb_fourier.forward(inp.t));
            let emb = mp_silu(&mp_sum(
                &emb,
                &self.emb_label.forward(inp.labels, inp.age),
                LABEL_BALANCE,
            ));
            let x = inp.x.to_kind(self.precision.compute_kind());
            let ones = x.narrow(1, 0, 1).ones_like();
            return Ok(vec![
                emb,
                self.input_conv.forward(&Tensor::cat(&[&x, &ones], 1)),
            ]);
        }
        let (emb, x) = (
            values.first().ok_or_else(missing)?,
            values.last().ok_or_else(missing)?,
        );
        let keys = at.keys;
        Ok(vec![if i <= e {
            self.encoder[i - 1].forward(x, Some(emb), keys)
        } else if i <= e + d {
            let k = i - 1 - e;
            let x = match self.skip_of[k] {
                Some(s) => mp_cat(x, values.get(s).ok_or_else(missing)?, CONCAT_BALANCE),
                None => x.shallow_clone(),
            };
            self.decoder[k].forward(&x, Some(emb), keys)
        } else {
            self.out_conv
                .forward_gain(x, &self.out_gain)
                .to_kind(Kind::Float)
        }])
    }

    /// Every MPConv weight (EDM2 normalises each output channel); the gains and the Fourier buffers are not.
    fn normalized_rows(&self, name: &str) -> bool {
        name.ends_with(".weight")
    }

    fn set_precision(&mut self, precision: Precision) {
        RadUNet::set_precision(self, precision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unet::mp::Resample;
    use tch::{Device, nn::VarStore};

    fn inputs(cfg: &UNetConfig, b: i64) -> (Tensor, Tensor, Tensor, Tensor) {
        let x = Tensor::randn(
            [b, cfg.img_channels, cfg.img_resolution, cfg.img_resolution],
            (Kind::Float, Device::Cpu),
        );
        let t = Tensor::rand([b], (Kind::Float, Device::Cpu));
        let labels = Tensor::stack(
            &cfg.classes
                .iter()
                .map(|&k| Tensor::randint(k, [b], (Kind::Int64, Device::Cpu)))
                .collect::<Vec<_>>(),
            1,
        );
        let age = Tensor::from_slice(&[0.63f32, f32::NAN]).repeat([b / 2]);
        (x, t, labels, age)
    }

    #[test]
    fn keyed_dropout_gives_a_sample_the_same_velocity_whatever_the_batch() {
        tch::manual_seed(2);
        let cfg = UNetConfig {
            dropout: 0.25,
            ..UNetConfig::preset("unet-tiny").unwrap()
        };
        let vs = VarStore::new(Device::Cpu);
        let net = RadUNet::new(&vs.root(), &cfg).unwrap();
        tch::no_grad(|| {
            let _ = net.out_gain.shallow_clone().fill_(1.0);
        });
        let (x, t, labels, age) = inputs(&cfg, 4);
        let keys = super::dropout::keys(9, 100, &[0, 1, 2, 3]);
        let whole = net.forward_train(&x, &t, &labels, &age, &keys).unwrap();
        let half = |start: i64| {
            let s = |v: &Tensor| v.narrow(0, start, 2);
            net.forward_train(&s(&x), &s(&t), &s(&labels), &s(&age), &s(&keys))
                .unwrap()
        };
        let halves = Tensor::cat(&[half(0), half(2)], 0);
        let gap = (&whole - &halves).abs().max().double_value(&[]);
        assert!(gap < 1e-5, "{gap}");
        // Dropout is on in training only, and another step draws other masks.
        let eval = net.forward(&x, &t, &labels, &age).unwrap();
        assert!((&whole - &eval).abs().max().double_value(&[]) > 1e-3);
        let other = super::dropout::keys(9, 101, &[0, 1, 2, 3]);
        let next = net.forward_train(&x, &t, &labels, &age, &other).unwrap();
        assert!((&whole - &next).abs().max().double_value(&[]) > 1e-3);
        let err = net
            .forward_train(&x, &t, &labels, &age, &keys.narrow(0, 0, 3))
            .unwrap_err();
        assert!(err.to_string().contains("keys"), "{err}");
    }

    #[test]
    fn the_built_network_has_the_closed_form_count_and_starts_at_zero() {
        tch::manual_seed(0);
        let cfg = UNetConfig::preset("unet-tiny").unwrap();
        let vs = VarStore::new(Device::Cpu);
        let net = RadUNet::new(&vs.root(), &cfg).unwrap();
        let trainable: i64 = vs
            .trainable_variables()
            .iter()
            .map(Tensor::numel)
            .map(|n| n as i64)
            .sum();
        assert_eq!(trainable as u64, cfg.parameter_count().total());
        let (x, t, labels, age) = inputs(&cfg, 4);
        let v = net.forward(&x, &t, &labels, &age).unwrap();
        assert_eq!(v.size(), x.size());
        assert_eq!(v.abs().max().double_value(&[]), 0.0, "out_gain starts at 0");
        assert_eq!(
            net.encoder
                .iter()
                .chain(&net.decoder)
                .filter(|b| b.plan.resample == Resample::Down)
                .count(),
            1
        );
        let err = net
            .forward(&x.narrow(2, 0, 8), &t, &labels, &age)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("expected float [batch, 1, 16, 16]"),
            "{err}"
        );
    }
}
