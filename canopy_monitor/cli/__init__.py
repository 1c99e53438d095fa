"""The `canopy-monitor` command line."""
