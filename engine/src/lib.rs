//! The distributed runtime a rank trains on, knowing no job: collectives (MPI, NCCL, TCP, in-process), the FSDP
//! engine with its optimiser, checkpoints, which GPU a rank drives, the progress its heartbeat reports, how a rank
//! joins its run, and allocation failures as errors.
//!
//! - [`collective`]: the rank group's operations and their backends, with one conformance suite.
//! - [`fsdp`]: sharded parameters, gradients and optimiser state over any [`radit_models::block::BlockModel`].
//! - [`data_parallel`]: replicated state and overlapped gradient all-reduces over any
//!   [`radit_models::staged::StagedModel`] (RadUNet's skip connections included).
//! - [`training`]: the one trait both engines implement, and the engine a job's settings and network pick;
//!   [`weight_norm`]: EDM2's forced weight normalisation of the master weights, on whole or sharded groups.
//! - [`checkpoint`]: sharded, hashed, resumable checkpoints on a filesystem or an object store.
//! - [`membership`]: a rank joining its run (rendezvous, generation, supersession): the rank agent's side.
//! - [`progress`]: what a rank's heartbeat reports (step, phase, throughput, memory).
//! - [`placement`]: which GPU a rank drives.
//! - [`runtime`]: which libtorch is loaded and which devices it sees; [`libraries`]: the loaded shared libraries.
//! - [`out_of_memory`]: allocation failures anywhere in a step or a unit as errors, not panics.
//! - [`threads`]: how many libtorch threads a process uses, from its cores, its node's ranks and its work.
//! - [`faults`]: the fault plan the end-to-end tests inject, read once by the binary and passed in.

pub mod checkpoint;
pub mod collective;
pub mod data_parallel;
pub mod faults;
pub mod fsdp;
pub mod libraries;
pub mod membership;
pub mod out_of_memory;
pub mod placement;
pub mod progress;
pub mod runtime;
pub mod threads;
pub mod training;
pub mod weight_norm;
