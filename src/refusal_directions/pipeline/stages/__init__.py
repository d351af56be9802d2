"""The four stages of a run, one module each: ``extract`` -> ``select`` -> ``infer`` -> ``evaluate``.

Each stage reads the artifacts of the stages before it (from memory when the caller passes them,
else from the run folder, refusing stale ones), reuses its own valid artifacts, computes the rest,
and returns data; nothing here prints (the command line does, ``cli``).
"""
