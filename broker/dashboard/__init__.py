"""The dashboard's static files (``index.html``, ``dashboard.js``, ``dashboard.css``), served
by :mod:`broker.api.dashboard`. Hand-written, no third-party code; docs/dashboard.md."""
