"""The end-to-end demo: an order service, the relay and a billing consumer (`make demo`)."""
