//! Dropout whose randomness is a function of (seed, step, sample, block, element) alone: a sample's mask does not
//! depend on which rank holds it, how the batch is split or the device, so worlds 1, 2 and 4 train the same model.
//! The mask is a counter-based hash (SplitMix64's finaliser) computed with integer tensor ops on the model's device.

use tch::{Kind, Tensor};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const MIX1: u64 = 0xBF58_476D_1CE4_E5B9;
const MIX2: u64 = 0x94D0_49BB_1331_11EB;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(MIX1);
    z = (z ^ (z >> 27)).wrapping_mul(MIX2);
    z ^ (z >> 31)
}

/// One sample's dropout key for one training step: the same on any rank and world size.
pub fn sample_key(seed: u64, step: u64, sample: u64) -> i64 {
    splitmix(splitmix(splitmix(seed) ^ step) ^ sample) as i64
}

/// The per-sample keys of a batch whose rows are the global samples `samples`, as an int64 tensor.
pub fn keys(seed: u64, step: u64, samples: &[u64]) -> Tensor {
    let k: Vec<i64> = samples.iter().map(|&s| sample_key(seed, step, s)).collect();
    Tensor::from_slice(&k)
}

/// x >> s, shifting in zeros (torch's >> on int64 is arithmetic).
fn shift_right(x: &Tensor, s: i64) -> Tensor {
    x.bitwise_right_shift_tensor_scalar(s)
        .bitwise_and((1i64 << (64 - s)) - 1)
}

/// Uniform numbers in [0, 1) with 24 bits, of shape [B, rest...] for `keys` [B], as a function of (key, block,
/// element index) only.
pub fn keyed_uniform(keys: &Tensor, block: u64, rest: &[i64]) -> Tensor {
    let per: i64 = rest.iter().product();
    let n = keys.size()[0];
    let index = Tensor::arange(per, (Kind::Int64, keys.device())).unsqueeze(0);
    let base = keys
        .to_kind(Kind::Int64)
        .unsqueeze(1)
        .g_add_scalar(block.wrapping_mul(GOLDEN) as i64);
    let mut x = base + index.g_mul_scalar(MIX1 as i64);
    x = x
        .bitwise_xor_tensor(&shift_right(&x, 30))
        .g_mul_scalar(MIX1 as i64);
    x = x
        .bitwise_xor_tensor(&shift_right(&x, 27))
        .g_mul_scalar(MIX2 as i64);
    x = x.bitwise_xor_tensor(&shift_right(&x, 31));
    let mut shape = vec![n];
    shape.extend_from_slice(rest);
    (shift_right(&x, 40).to_kind(Kind::Float) * (1.0 / (1u64 << 24) as f64)).view(shape.as_slice())
}

/// Standard normal numbers of shape [B, rest...] as a function of (key, stream, element) only (Box-Muller on two
/// keyed uniform streams): a VAE's reparameterisation noise, the same for a sample on any world size.
pub fn keyed_normal(keys: &Tensor, stream: u64, rest: &[i64]) -> Tensor {
    // 1 - u is in (0, 1]: the logarithm stays finite.
    let u1 = keyed_uniform(keys, stream, rest).neg() + 1.0;
    let u2 = keyed_uniform(keys, stream ^ (1 << 63), rest);
    (u1.log() * -2.0).sqrt() * (u2 * (2.0 * std::f64::consts::PI)).cos()
}

/// Inverted dropout of `y` [B, ...] at rate `p` with the keyed mask of `block`.
pub fn apply(y: &Tensor, p: f64, keys: &Tensor, block: u64) -> Tensor {
    let keep = keyed_uniform(keys, block, &y.size()[1..]).ge(p);
    y * keep.to_kind(y.kind()) * (1.0 / (1.0 - p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_normals_are_standard_normal_and_a_samples_own() {
        let k = keys(1, 2, &(0..64).collect::<Vec<_>>());
        let z = keyed_normal(&k, 9, &[16, 16]);
        let (mean, std) = (
            z.mean(Kind::Double).double_value(&[]),
            z.std(true).double_value(&[]),
        );
        assert!(
            mean.abs() < 0.02 && (std - 1.0).abs() < 0.02,
            "{mean} {std}"
        );
        let part = keyed_normal(&k.narrow(0, 10, 3), 9, &[16, 16]);
        assert!(part.equal(&z.narrow(0, 10, 3)));
        assert!(
            !keyed_normal(&k, 10, &[16, 16]).equal(&z),
            "another stream, other numbers"
        );
    }

    #[test]
    fn a_samples_mask_is_its_own_whatever_the_batch() {
        let k = keys(5, 7, &[10, 11, 12, 13]);
        let whole = keyed_uniform(&k, 3, &[4, 6, 6]);
        let halves = Tensor::cat(
            &[
                keyed_uniform(&keys(5, 7, &[10, 11]), 3, &[4, 6, 6]),
                keyed_uniform(&keys(5, 7, &[12, 13]), 3, &[4, 6, 6]),
            ],
            0,
        );
        assert!(whole.equal(&halves));
        // Another block, step or sample draws another mask; the numbers are uniform.
        assert!(!whole.equal(&keyed_uniform(&k, 4, &[4, 6, 6])));
        assert!(!whole.equal(&keyed_uniform(
            &keys(5, 8, &[10, 11, 12, 13]),
            3,
            &[4, 6, 6]
        )));
        let many = keyed_uniform(&keys(1, 1, &[0]), 0, &[100_000]);
        let mean = many.mean(Kind::Double).double_value(&[]);
        let below = many
            .lt(0.1)
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[]);
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
        assert!((below - 0.1).abs() < 0.005, "{below}");
        assert!(many.min().double_value(&[]) >= 0.0 && many.max().double_value(&[]) < 1.0);
    }
}
