"""Moved: ``SqlKeychainStore`` is in ``state.sql.keychain``; this name is kept for callers."""

from archive_kms.state.sql.keychain import SqlKeychainStore

__all__ = ["SqlKeychainStore"]
