"""The domain core between the models and the worker: batches of records in, what happened out.

No Faust, no Kafka client, no sink: a processor reads stored values through a function, changes
the folds of the partitions it owns and returns the writes, outputs and counts of a batch; the
worker (:mod:`streams.worker`) produces them and exports the counts. ``models/`` is the ground
floor below it.
"""
