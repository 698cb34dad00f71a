//! How ranks start: local processes, `mpirun`, and Slurm (sbatch rendering for Isambard-AI, requeue chains).
//! Not built yet: this crate holds the place the architecture gives it (see `shared/design/architecture.md`).
