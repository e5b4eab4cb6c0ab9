"""Client side: the party process and its connection to the aggregator."""
