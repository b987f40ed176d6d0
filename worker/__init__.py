"""streamadapt worker: consume, validate, serve and (later) adapt a model on a Kafka purchase stream."""
