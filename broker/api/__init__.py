"""The broker's HTTP front door: routes, auth, notices and the one error handler."""
