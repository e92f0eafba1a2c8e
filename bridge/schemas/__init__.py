"""The event schemas (JSON Schema 2020-12), `<event type>/<version>.json`, read through
`bridge.validation`: data, shipped in the wheel."""
