"""Server side: the aggregator process, its gRPC servicer and model broadcast."""
