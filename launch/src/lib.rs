//! How ranks start, and nothing else: launchers behind one trait ([`launcher`]: local processes, `mpirun`, srun
//! inside a Slurm allocation) and Slurm itself ([`slurm`]: the Isambard-AI sbatch script, sbatch submission,
//! following a job through requeues). A leaf over `radit_protocol` (the variables ranks read): it links no
//! libtorch and knows no train config or coordinator; the run layer (`radit_run`) composes those.

pub mod launcher;
pub mod slurm;
