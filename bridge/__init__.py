"""kaiko-bridge: vendor crypto index and market data onto Kafka as schema-versioned events."""

__version__ = "0.1.0"
