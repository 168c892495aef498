"""A fixed English vocabulary for synthetic tasks: needle keys and word lists without any download.

Plain, unambiguous content words (no function words), each listed once across the three tuples, so that a word of
the vocabulary never shows up by accident in a prompt's instructions or in a generic refusal.
"""

from __future__ import annotations

ADJECTIVES = tuple(
    """
    ancient angry bitter blunt bold brave bright brisk broad bumpy calm cheap chilly clever cloudy clumsy coarse
    cozy crisp cruel curious damp dark dense dizzy dusty eager early fancy fierce fluffy foggy fragile frosty fuzzy
    gentle giant glossy golden grumpy hairy handsome hasty heavy hollow honest hungry icy jolly juicy keen lazy
    lively lonely loud lucky mellow merry mighty misty modest muddy narrow nasty neat noble noisy odd pale patient
    plump polite proud quiet rapid rare rough round rusty salty scarlet shaggy shallow sharp shiny shy silent silky
    sleepy slim slow smoky smooth soft solid sour spicy steep sticky stormy sturdy sunny sweet swift tame tender
    thick thirsty tidy tiny tough vast velvet vivid warm wary wealthy wicked wild windy wise witty wooden young
    zealous
    """.split()
)

NOUNS = tuple(
    """
    acorn anchor apple apron arrow badger bagel balloon bamboo banjo barn basket beacon beetle bell bicycle blanket
    boat bottle bracelet bread brick bridge broom bucket buffalo button cabin cactus camel candle canoe canyon carpet
    carrot castle cedar cello chair cherry chimney circus cliff clock cloud coconut comet compass cookie copper
    cottage cradle crane crayon cricket crown crystal cupboard curtain daisy desert diamond dolphin donkey dragon
    drum eagle easel elephant engine falcon feather fence fern fiddle flute fountain fox frog garden garlic giraffe
    glacier goat gravel guitar hammer harbor harp hedgehog helmet hermit honey horizon island ivory jacket jaguar
    jelly jungle kangaroo kettle kitten ladder lagoon lantern lemon leopard lighthouse lizard lobster magnet mango
    maple marble meadow melon mirror monkey moose mountain mushroom needle nest nutmeg oasis ocean octopus olive
    onion orchard otter owl paddle palace panda parrot peach pebble pelican pencil pepper piano pigeon pillow pine
    planet plum pocket pony potato pumpkin puppet quartz quilt rabbit raccoon radish raven ribbon river robot rocket
    saddle salmon sandal satchel scarf shovel skillet sleigh snail spider spoon spruce squirrel statue stove
    sunflower swan teapot thistle thunder tiger tomato tortoise tower tractor trumpet tulip tunnel turnip turtle
    umbrella valley vase violin volcano wagon walnut walrus whale whistle willow window wizard zebra
    """.split()
)

VERBS = tuple(
    """
    bake balance bounce breathe build carve chase chop climb collect cook crawl dance dig dive drift drink dream
    explore fetch fish float fly fold gallop gather giggle glide grow hike hop hum hunt invent juggle jump kneel knit
    laugh launch listen march melt mend mix nibble observe paint pedal plant play polish pour pray pull push
    race read repair rescue ride roam row run sail scrub search sew shiver shout sing sip skate sketch ski sleep
    slide smile sneeze sniff sparkle spin splash sprint stitch stretch stroll swim swing tickle travel trot tumble
    twirl wander wash whisper wiggle wink wobble write yawn yell
    """.split()
)

WORDS = ADJECTIVES + NOUNS + VERBS
