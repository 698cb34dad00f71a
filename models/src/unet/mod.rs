//! RadUNet: the EDM2 U-Net adapted to rectified flow, the paper's U-Net baselines in pixel space (`unet-pixel`)
//! and latent space (`unet-latent`) (../shared/design/radunet.md). Built from EDM2's magnitude-preserving blocks
//! ([`mp`]); the architecture and its closed-form counts live in [`config`], the network in [`net`], and its
//! dropout, keyed by sample so that it does not depend on the world size, in [`dropout`]. RadVAE (Scratch), the
//! paper's autoencoder built from the same blocks, is in [`vae`]. Like RadiT they know nothing about ranks.

pub mod config;
pub mod dropout;
pub mod mp;
pub mod net;
pub mod vae;

pub use config::{UNET_PRESETS, UNetConfig, UNetCount};
pub use net::RadUNet;
pub use vae::{RADVAE_PRESETS, RadVae, RadVaeConfig};
