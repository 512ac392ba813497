"""Where the relay publishes: each sink a package implementing `relay.core.ports.Sink`."""
