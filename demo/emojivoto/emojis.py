"""The emoji the app votes on: upstream emojivoto's `top100Emoji` list, in its order.

Shortcodes and code points are those of BuoyantIO/emojivoto (`emojivoto-emoji-svc/emoji/emoji.go`
and its generated code map), so `/api/list` and the leaderboard read the same as the original app.
"""

from __future__ import annotations

# (shortcode, unicode) in upstream order; `/api/list` returns them in this order.
EMOJI: tuple[tuple[str, str], ...] = (
    (":joy:", "\U0001f602"),
    (":sunglasses:", "\U0001f60e"),
    (":doughnut:", "\U0001f369"),
    (":stuck_out_tongue_winking_eye:", "\U0001f61c"),
    (":money_mouth_face:", "\U0001f911"),
    (":flushed:", "\U0001f633"),
    (":mask:", "\U0001f637"),
    (":nerd_face:", "\U0001f913"),
    (":ghost:", "\U0001f47b"),
    (":skull_and_crossbones:", "\u2620\ufe0f"),
    (":heart_eyes_cat:", "\U0001f63b"),
    (":hear_no_evil:", "\U0001f649"),
    (":see_no_evil:", "\U0001f648"),
    (":speak_no_evil:", "\U0001f64a"),
    (":boy:", "\U0001f466"),
    (":girl:", "\U0001f467"),
    (":man:", "\U0001f468"),
    (":woman:", "\U0001f469"),
    (":older_man:", "\U0001f474"),
    (":policeman:", "\U0001f46e"),
    (":guardsman:", "\U0001f482"),
    (":construction_worker_man:", "\U0001f477"),
    (":prince:", "\U0001f934"),
    (":princess:", "\U0001f478"),
    (":man_in_tuxedo:", "\U0001f935"),
    (":bride_with_veil:", "\U0001f470"),
    (":mrs_claus:", "\U0001f936"),
    (":santa:", "\U0001f385"),
    (":turkey:", "\U0001f983"),
    (":rabbit:", "\U0001f430"),
    (":no_good_woman:", "\U0001f645"),
    (":ok_woman:", "\U0001f646"),
    (":raising_hand_woman:", "\U0001f64b"),
    (":bowing_man:", "\U0001f647"),
    (":man_facepalming:", "\U0001f926\u200d\u2642"),
    (":woman_shrugging:", "\U0001f937\u200d\u2640"),
    (":massage_woman:", "\U0001f486"),
    (":walking_man:", "\U0001f6b6"),
    (":running_man:", "\U0001f3c3"),
    (":dancer:", "\U0001f483"),
    (":man_dancing:", "\U0001f57a"),
    (":dancing_women:", "\U0001f46f"),
    (":rainbow:", "\U0001f308"),
    (":skier:", "\u26f7"),
    (":golfing_man:", "\U0001f3cc"),
    (":surfing_man:", "\U0001f3c4"),
    (":basketball_man:", "\u26f9"),
    (":biking_man:", "\U0001f6b4"),
    (":point_up_2:", "\U0001f446"),
    (":vulcan_salute:", "\U0001f596"),
    (":metal:", "\U0001f918"),
    (":call_me_hand:", "\U0001f919"),
    (":thumbsup:", "\U0001f44d"),
    (":wave:", "\U0001f44b"),
    (":clap:", "\U0001f44f"),
    (":raised_hands:", "\U0001f64c"),
    (":pray:", "\U0001f64f"),
    (":dog:", "\U0001f436"),
    (":cat2:", "\U0001f408"),
    (":pig:", "\U0001f437"),
    (":hatching_chick:", "\U0001f423"),
    (":snail:", "\U0001f40c"),
    (":bacon:", "\U0001f953"),
    (":pizza:", "\U0001f355"),
    (":taco:", "\U0001f32e"),
    (":burrito:", "\U0001f32f"),
    (":ramen:", "\U0001f35c"),
    (":champagne:", "\U0001f37e"),
    (":tropical_drink:", "\U0001f379"),
    (":beer:", "\U0001f37a"),
    (":tumbler_glass:", "\U0001f943"),
    (":world_map:", "\U0001f5fa"),
    (":beach_umbrella:", "\U0001f3d6"),
    (":mountain_snow:", "\U0001f3d4"),
    (":camping:", "\U0001f3d5"),
    (":steam_locomotive:", "\U0001f682"),
    (":flight_departure:", "\U0001f6eb"),
    (":rocket:", "\U0001f680"),
    (":star2:", "\U0001f31f"),
    (":sun_behind_small_cloud:", "\U0001f324"),
    (":cloud_with_rain:", "\U0001f327"),
    (":fire:", "\U0001f525"),
    (":jack_o_lantern:", "\U0001f383"),
    (":balloon:", "\U0001f388"),
    (":tada:", "\U0001f389"),
    (":trophy:", "\U0001f3c6"),
    (":iphone:", "\U0001f4f1"),
    (":pager:", "\U0001f4df"),
    (":fax:", "\U0001f4e0"),
    (":bulb:", "\U0001f4a1"),
    (":money_with_wings:", "\U0001f4b8"),
    (":crystal_ball:", "\U0001f52e"),
    (":underage:", "\U0001f51e"),
    (":interrobang:", "\u2049\ufe0f"),
    (":100:", "\U0001f4af"),
    (":checkered_flag:", "\U0001f3c1"),
    (":crossed_swords:", "\u2694\ufe0f"),
    (":floppy_disk:", "\U0001f4be"),
    (":poop:", "\U0001f4a9"),
)

DOUGHNUT = ":doughnut:"

_BY_SHORTCODE = dict(EMOJI)


def find_by_shortcode(shortcode: str) -> str | None:
    """The unicode of `shortcode`, or None when the app has no such emoji."""
    return _BY_SHORTCODE.get(shortcode)


def vote_method(shortcode: str) -> str:
    """The VotingService method that records a vote for `shortcode`.

    Upstream names one RPC per emoji by camel-casing the shortcode (`:stuck_out_tongue_winking_eye:`
    -> `VoteStuckOutTongueWinkingEye`, `:100:` -> `Vote100`); a unit test checks every emoji maps to a
    method the .proto really declares.
    """
    words = shortcode.strip(":").split("_")
    return "Vote" + "".join(w[:1].upper() + w[1:] for w in words)


def shortcode_of_method(method: str) -> str | None:
    """The shortcode a `Vote<Name>` method votes for (None for methods of no listed emoji)."""
    return _SHORTCODE_BY_METHOD.get(method)


_SHORTCODE_BY_METHOD = {vote_method(code): code for code, _ in EMOJI}
# Upstream declares VoteRelaxed although :relaxed: is not in its list; its server still counts it.
_SHORTCODE_BY_METHOD["VoteRelaxed"] = ":relaxed:"
