"""`pi-lora push RELEASE REPO_ID`: its options and what it does once they are parsed
(pi_lora.release.push checks the release, lists its files and uploads them)."""

from __future__ import annotations

import argparse


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("release", metavar="RELEASE",
                        help="release directory pi-lora merge wrote (its README.md model card "
                             "and certificate.json go with it)")
    parser.add_argument("repo_id", metavar="REPO_ID",
                        help="hub model repository, OWNER/NAME (created when missing)")
    parser.add_argument("--private", action="store_true",
                        help="create the repository private (an existing one keeps its setting)")
    parser.add_argument("--revision", metavar="BRANCH",
                        help="branch to commit to, created from main when missing (default: main)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list every file with its size, the total, the repository and "
                             "revision; upload nothing (needs no network or token)")


def cmd_push(args: argparse.Namespace) -> int:
    """One commit of the whole release; a dry run only prints what it would be."""
    from pi_lora.release.push import check_can_upload, describe, plan_push, push_release

    plan = plan_push(args.release, args.repo_id, revision=args.revision, private=args.private)
    if args.dry_run:
        print(describe(plan, dry_run=True))
        print(f"pi-lora: dry run: nothing uploaded; without --dry-run this pushes to "
              f"{plan.repo_id}")
        return 0
    token = check_can_upload()
    print(describe(plan, dry_run=False), flush=True)
    url = push_release(plan, token)
    print(f"pi-lora: pushed {plan.release} as {url}\n"
          f"  load it with: AutoModelForCausalLM.from_pretrained({plan.repo_id!r}"
          + (f", revision={plan.revision!r})" if plan.revision != "main" else ")"))
    return 0
