"""`qtoy push RUN REPO_ID`: a run folder to a Hugging Face hub model repo (qtoy_core.publish)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("push")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="create the repo as private")
@click.option("--dry-run", "dry_run", type=click.Path(file_okay=False),
              help="write the folder that would be uploaded to DIR, and upload nothing")
@click.option("--message", help="commit message on the hub")
def push_command(run, repo_id, private, dry_run, message) -> None:
    """Upload RUN's config, weights, tokenizer, model card (README.md) and loss curves to the hub model
    repo REPO_ID (e.g. you/my-toy-model). Needs HF_HUB_OFFLINE=0 (qtoy keeps the hub off by default) and
    a token (`hf auth login` or HF_TOKEN).

      qtoy push runs/t2 you/t2-quadratic --dry-run upload/   # see what would be uploaded

      HF_HUB_OFFLINE=0 qtoy push runs/t2 you/t2-quadratic --private
    """
    from qtoy_core.publish import describe_upload, prepare_upload, push

    if dry_run:
        folder = prepare_upload(run, dry_run, repo_id=repo_id)
        for f in describe_upload(folder):
            click.echo(f"{f['file']:<20} {f['bytes']:>12,} bytes")
        click.echo(f"would upload {Path(folder)} to {repo_id} (dry run: nothing uploaded)")
        return
    url = push(run, repo_id, private=private, commit_message=message)
    click.echo(f"pushed {run} to {url}")
