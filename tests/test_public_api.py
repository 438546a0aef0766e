import stem


def test_public_names_are_exactly_the_documented_ones():
    expected = {"Stem", "AsyncStem", "Worker", "TaskRegistry", "TaskOptions", "TaskContext", "TaskHandler",
                "FunctionTaskHandler", "TaskHandle", "TaskRef", "AsyncTaskRef", "TaskState", "TaskStatus", "TaskResult", "StemConfig", "PayloadSigner",
                "RetryStrategy", "ExponentialJitterRetryStrategy", "WorkerLifecycleConfig", "ShutdownMode",
                "signals", "StemSignals", "StemError", "IMPLEMENTATION", "__version__"}
    assert set(stem.__all__) == expected
    for name in stem.__all__:
        assert hasattr(stem, name), name


def test_errors_hierarchy_roots_at_stem_error():
    from stem import errors
    for name in errors.__all__:
        cls = getattr(errors, name)
        if name in ("SoftTimeLimitExceeded", "Retry", "WorkerShutdown"):
            assert not issubclass(cls, Exception)
        else:
            assert issubclass(cls, errors.StemError), name
    assert issubclass(errors.DecodeError, ValueError)
