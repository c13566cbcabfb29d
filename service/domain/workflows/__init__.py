"""Workflows: definitions (:mod:`.definition`), rows (:mod:`.service`), the API (:mod:`.routes`)
and their execution on the worker (:mod:`.executor`, :mod:`.jobs`)."""

from service.domain.workflows.definition import DefinitionError, WorkflowDefinition, parse_definition
from service.domain.workflows.service import create_workflow

__all__ = ["DefinitionError", "WorkflowDefinition", "create_workflow", "parse_definition"]
