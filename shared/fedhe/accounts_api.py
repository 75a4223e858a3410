"""The account and token routes every service serves (``/v1/accounts``, ``/v1/tokens``, ``/v1/whoami``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from fedhe.accounts import AccountService, Principal, Role
from fedhe.errors import PermissionDenied
from fedhe.http_auth import allow, authenticated
from fedhe.identifiers import AccountNamePath, TokenIdPath
from fedhe.openapi import ERRORS
from fedhe.schemas import AccountCreate, AccountPublic, TokenCreate, TokenIssued, TokenPublic, WhoAmI


def _accounts(request: Request) -> AccountService:
    service: AccountService = request.app.state.authenticator.accounts
    return service


def _admin_or_self(
    name: AccountNamePath, caller: Annotated[Principal, allow(Role.ADMIN, Role.VIEWER, Role.SERVICE)]
) -> Principal:
    if caller.role != Role.ADMIN and caller.name != name:
        raise PermissionDenied("only an admin may manage another account's tokens", code="forbidden_role")
    return caller


def _admin_or_owner(
    token_id: TokenIdPath,
    accounts: Annotated[AccountService, Depends(_accounts)],
    caller: Annotated[Principal, allow(Role.ADMIN, Role.VIEWER, Role.SERVICE)],
) -> Principal:
    if caller.role != Role.ADMIN and accounts.token_owner(token_id) != caller.name:
        raise PermissionDenied("only an admin may revoke another account's token", code="forbidden_role")
    return caller


SESSION_HOURS = 8

Accounts = Annotated[AccountService, Depends(_accounts)]
Person = Annotated[Principal, allow(Role.ADMIN, Role.VIEWER)]
Admin = Annotated[Principal, allow(Role.ADMIN)]
AdminOrSelf = Annotated[Principal, Depends(_admin_or_self)]
AdminOrOwner = Annotated[Principal, Depends(_admin_or_owner)]
Anyone = Annotated[Principal, Depends(authenticated)]

router = APIRouter(prefix="/v1", tags=["accounts"], responses=ERRORS)


@router.get("/whoami", response_model=WhoAmI)
def whoami(caller: Anyone) -> WhoAmI:
    """The authenticated caller: account name and role, or site id."""
    return WhoAmI(name=caller.name, role=caller.role, site_id=caller.site_id)


@router.post("/sessions", status_code=201, response_model=TokenIssued)
def start_session(accounts: Accounts, caller: Person) -> TokenIssued:
    """Exchange the caller's token for one that expires in 8 hours (what the dashboard keeps in the browser)."""
    return accounts.issue_session(caller, SESSION_HOURS)


@router.get("/accounts", response_model=list[AccountPublic])
def list_accounts(accounts: Accounts, _: Admin) -> list[AccountPublic]:
    """Every account of this service."""
    return accounts.accounts()


@router.post("/accounts", status_code=201, response_model=AccountPublic)
def create_account(body: AccountCreate, accounts: Accounts, caller: Admin) -> AccountPublic:
    """Create a named account (admin); give it a token with ``POST /v1/accounts/{name}/tokens``."""
    return accounts.create_account(body, actor=caller.actor)


@router.post("/accounts/{name}/disable", response_model=AccountPublic)
def disable_account(name: AccountNamePath, accounts: Accounts, caller: Admin) -> AccountPublic:
    """Disable an account and revoke all its tokens (admin)."""
    return accounts.disable_account(name, actor=caller.actor)


@router.get("/accounts/{name}/tokens", response_model=list[TokenPublic])
def list_tokens(name: AccountNamePath, accounts: Accounts, _: AdminOrSelf) -> list[TokenPublic]:
    """An account's tokens, metadata only (admin, or the account itself)."""
    return accounts.tokens(name)


@router.post("/accounts/{name}/tokens", status_code=201, response_model=TokenIssued)
def issue_token(name: AccountNamePath, body: TokenCreate, accounts: Accounts, caller: AdminOrSelf) -> TokenIssued:
    """Issue a token for an account (admin, or the account itself); the token is shown this once."""
    return accounts.issue_token(name, body, caller=caller)


@router.post("/tokens/{token_id}/revoke", response_model=TokenPublic)
def revoke_token(token_id: TokenIdPath, accounts: Accounts, caller: AdminOrOwner) -> TokenPublic:
    """Revoke a token at once (admin, or its owner)."""
    return accounts.revoke_token(token_id, caller=caller)
