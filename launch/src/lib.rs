//! How a run starts and keeps going (who a rank is, from its launcher's variables, is `radit_protocol::env`): the job spec ([`job`]), launchers behind one trait ([`launcher`]: local
//! processes, `mpirun`, srun inside a Slurm allocation), the supervisor that hosts the coordinator and restarts
//! failed or hung generations ([`supervise`]), and Slurm itself ([`slurm`]: the Isambard-AI sbatch script, sbatch
//! submission, following the job through requeues).

pub mod job;
pub mod launcher;
pub mod report;
pub mod slurm;
pub mod supervise;
