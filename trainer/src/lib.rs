//! The training side of radit and the only crate that links libtorch (through `tch`): the RadiT model, the
//! rectified-flow objective, samplers, collectives, the FSDP engine, checkpoints and the train loop.
//!
//! This first version provides the runtime probe the other parts build on: which libtorch is loaded, and which
//! devices it sees.
//!
//! ```no_run
//! let info = radit_trainer::runtime::probe();
//! println!("libtorch from {:?}, {} CUDA device(s)", info.libtorch_path, info.cuda_devices);
//! ```

pub mod runtime;
