"""The local Dask cluster's worker processes run without Dask's statistical profiler: on
CPython 3.11 its ``sys._current_frames()`` call can deadlock a worker when a garbage
collection starts inside it (a copy step hung in the suite with every thread of the worker
waiting for the GIL). ``flows/migration.py`` (``LOCAL_DASK_CONFIG``); docs/migration-flows.md."""

from __future__ import annotations


def test_the_local_cluster_workers_run_without_the_profiler():
    import dask
    from archive_kms.flows.migration import LOCAL_DASK_CLUSTER, task_runner_for
    from distributed import Client, LocalCluster

    from archive_kms.config import Settings

    with dask.config.set({"distributed.worker.profile.enabled": True}):  # Dask's default
        runner = task_runner_for("dask", Settings(dask_address=None))
        assert type(runner).__name__ == "DaskTaskRunner"
        assert dask.config.get("distributed.worker.profile.enabled") is False
        # what a worker process of that cluster sees (its Nanny hands it this process's config)
        kwargs = {**LOCAL_DASK_CLUSTER, "n_workers": 1, "threads_per_worker": 1}
        with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
            seen = client.run(lambda: dask.config.get("distributed.worker.profile.enabled"))
            profiling = client.run(lambda dask_worker: dask_worker.periodic_callbacks.get("profile") is not None)
    assert list(seen.values()) == [False]
    assert list(profiling.values()) == [False]
