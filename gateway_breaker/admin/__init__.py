"""The admin API (a Starlette app), the dashboard page and its static files."""

from gateway_breaker.admin.app import MAX_BODY_BYTES, admin_app

__all__ = ["MAX_BODY_BYTES", "admin_app"]
