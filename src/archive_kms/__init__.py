"""archive_kms: move a tenant's archive onto the tenant's own key, and keep it there safely."""

__version__ = "0.1.0"
