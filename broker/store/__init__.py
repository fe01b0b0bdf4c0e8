"""Where page bytes and persistent-page records live (see docs/dev/interfaces.md)."""
