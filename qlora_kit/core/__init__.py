"""What every other package uses: errors, the config schema, bounded YAML, logs, signals, atomic
file writes, free-space checks and the safetensors header reader."""
