"""Azure Blob by account URL and Microsoft Entra ID (no shared key), as infra/azure deploys it."""

from __future__ import annotations

from azure.identity import DefaultAzureCredential

from archive_kms import clients
from archive_kms.config import Settings


def test_account_url_without_connection_string_uses_entra_id() -> None:
    s = Settings(
        azure_blob_connection_string=None, azure_blob_account_url="https://akmsshared0123456789.blob.core.windows.net/"
    )
    svc = clients.blob_service_client(s)
    assert svc.account_name == "akmsshared0123456789"
    assert isinstance(svc.credential, DefaultAzureCredential)


def test_a_connection_string_still_wins() -> None:
    cs = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
    s = Settings(azure_blob_connection_string=cs, azure_blob_account_url="https://other.blob.core.windows.net/")
    assert clients.blob_service_client(s).account_name == "devstoreaccount1"
