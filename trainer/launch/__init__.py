"""Where ranks come from and how they stop: the process group (`distributed`), the entry point of
every rank (`rank`), Plait's own spawner (`spawn`), forked ranks for tests and notebooks
(`forked`), Slurm submission (`slurm`) and the srun rendezvous (`slurm_env`), and preemption."""
