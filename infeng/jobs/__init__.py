"""Batch jobs: streamed input, a journal that makes them resumable, sharding over Ray.

    run_batch_job(BatchJob(model_path, "big.jsonl", Path("out.jsonl"), defaults))

drives the one Engine (infeng.runtime) through its public API; nothing here generates tokens.
"""
from infeng.jobs.job import Interrupted
from infeng.jobs.run import BatchJob, run_batch_job

__all__ = ["BatchJob", "Interrupted", "run_batch_job"]
