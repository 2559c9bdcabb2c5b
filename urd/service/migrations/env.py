"""Alembic environment of the ledger: runs on the connection urd.service.ledger.Ledger.upgrade hands over."""

from alembic import context

from urd.service.ledger import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
