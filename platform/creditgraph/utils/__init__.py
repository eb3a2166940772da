"""Cross-cutting helpers: atomic I/O, logging, the Ray runtime."""
