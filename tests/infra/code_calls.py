"""What the code calls on AWS and Azure, read from the source (AST), not from a list kept
by hand: the IAM and RBAC tests compare it with what the templates grant.

A call counts when its receiver is one of the adapters' SDK clients (``self._s3``,
``s3_client``, ``self._kms``, ...) in ``src/archive_kms`` (the demo, which plays the
customer and creates keys and buckets by hand, is not the platform and is left out).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import yaml
from source_trees import parse_tree

from archive_kms.config import PROJECT_ROOT

SRC = PROJECT_ROOT / "src" / "archive_kms"
NOT_PLATFORM = {"demo.py"}

S3_RECEIVERS = {"s3", "_s3", "s3_client"}
KMS_RECEIVERS = {"kms", "_kms"}


@dataclass(frozen=True)
class Call:
    file: str  # relative to src/archive_kms
    line: int
    receiver: str
    method: str
    keywords: frozenset[str]
    first_arg: str | None  # a string literal first argument (get_paginator("list_objects_v2"))


def _receiver(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def sdk_calls(receivers: set[str], operations: set[str]) -> list[Call]:
    """Every call of, or reference to (``call("PutPublicAccessBlock", s3.put_public_access_block)``),
    a method in ``operations`` on one of ``receivers``."""
    calls = []
    for path, tree in parse_tree(SRC).items():
        rel = path.relative_to(SRC).as_posix()
        if rel in NOT_PLATFORM:
            continue
        called: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                called.add(id(node.func))
                recv = _receiver(node.func.value)
                if recv not in receivers or node.func.attr not in operations:
                    continue
                first = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
                keywords = {k.arg for k in node.keywords if k.arg}
                if any(k.arg is None for k in node.keywords):
                    keywords.add("**")
                calls.append(
                    Call(
                        rel,
                        node.lineno,
                        recv,
                        node.func.attr,
                        frozenset(keywords),
                        first if isinstance(first, str) else None,
                    )
                )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and id(node) not in called
                and _receiver(node.value) in receivers
                and node.attr in operations
            ):
                calls.append(Call(rel, node.lineno, _receiver(node.value) or "", node.attr, frozenset({"**"}), None))
    return calls


# --- reading templates -----------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Ref, !Sub, !GetAtt ...) kept as {tag: value}."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, object]:
    if isinstance(node, yaml.ScalarNode):
        value: object = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {suffix: value}


_CfnLoader.add_multi_constructor("!", _tag)


def load_cfn(path: Path) -> dict[str, object]:
    return yaml.load(path.read_text(), Loader=_CfnLoader)


def policy_statements(template: dict, logical_id: str) -> list[dict]:
    """The statements of the inline policies of role ``logical_id``."""
    role = template["Resources"][logical_id]
    return [st for pol in role["Properties"]["Policies"] for st in pol["PolicyDocument"]["Statement"]]


def actions_of(statements: list[dict]) -> set[str]:
    out: set[str] = set()
    for st in statements:
        assert st["Effect"] == "Allow", st
        acts = st["Action"]
        out.update([acts] if isinstance(acts, str) else acts)
    return out
