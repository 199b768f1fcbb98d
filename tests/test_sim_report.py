"""simulator.report: where a run's figures "to target" are taken."""

from __future__ import annotations

import io

from simulator.report import Point, Progress


def _progress(*points: tuple[float, int, float | None, int | None, int]) -> Progress:
    p = Progress(out=io.StringIO())
    for t, version, acc, eval_version, uploads in points:
        p.history.append(
            Point(
                t=t,
                version=version,
                accuracy=acc,
                uploads=uploads,
                bytes_uploaded=100 * uploads,
                online=20,
                bytes_downloaded=150 * uploads,
                eval_version=eval_version,
            )
        )
    return p


def test_figures_are_taken_where_the_version_reaching_the_target_was_published() -> None:
    # v5 is published at t=1.0 (100 uploads); its evaluation is seen at t=1.2, when 13 more
    # uploads of the next round (and the devices' downloads of v5) have happened.
    p = _progress(
        (0.8, 4, 0.85, 4, 90),
        (1.0, 5, 0.85, 4, 100),
        (1.2, 5, 0.91, 5, 113),
        (1.4, 6, 0.92, 6, 120),
    )
    reached = p.first_reaching(0.90)
    assert reached is not None
    assert (reached.t, reached.version, reached.uploads, reached.bytes_total) == (
        1.0,
        5,
        100,
        25_000,
    )


def test_a_point_evaluated_at_its_own_sample_is_taken_itself() -> None:
    p = _progress((0.5, 1, 0.5, 1, 10), (1.0, 2, 0.95, 2, 20))
    reached = p.first_reaching(0.9)
    assert reached is not None and reached.t == 1.0


def test_an_evaluation_without_a_version_is_taken_where_it_was_seen() -> None:
    p = _progress((0.5, 1, 0.5, None, 10), (1.0, 3, 0.95, None, 30))
    reached = p.first_reaching(0.9)
    assert reached is not None and reached.t == 1.0


def test_a_target_never_reached_gives_none() -> None:
    assert _progress((0.5, 1, 0.5, 1, 10), (1.0, 2, None, None, 20)).first_reaching(0.9) is None
