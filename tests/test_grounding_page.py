"""The serve page's hover maps, drawn in headless Chromium: each label's map lies on its own
object of a two-object scene (the page draws what the overlays draw)."""

import os

import pytest
from test_grounding_maps import OBJECTS, SIZE, two_object_scene
from test_serve import CHROMEDRIVER, CHROMIUM, chrome, server_in_thread

from nxtrec.inference.recognizer import Recognizer
from nxtrec.serving.app import create_app

# Mean opacity of the drawn layer over a box of the picture (canvas pixels), leaving out the
# colour scale at the right edge and the title at the top left.
MEAN_ALPHA = """
const [box] = arguments, canvas = document.querySelector('.result canvas');
const side = Math.min(canvas.width, canvas.height);
const x0 = (canvas.width - side) / 2, y0 = (canvas.height - side) / 2, s = side / SIZE;
const left = Math.round(x0 + box[0] * s), top = Math.round(y0 + Math.max(box[1], 40) * s);
const right = Math.round(x0 + Math.min(box[2], 190) * s), bottom = Math.round(y0 + box[3] * s);
const data = canvas.getContext('2d').getImageData(left, top, right - left, bottom - top).data;
let sum = 0;
for (let i = 3; i < data.length; i += 4) sum += data[i];
return sum / (data.length / 4);
""".replace("SIZE", str(SIZE))


@pytest.mark.slow
@pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                    reason=f"no browser: install Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
def test_page_hover_maps_lie_on_each_labels_object(tmp_path):
    pytest.importorskip("selenium", reason="selenium is not installed (pip install 'nxtrec[dev]')")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    scene = tmp_path / "two.png"
    two_object_scene().save(scene)
    with server_in_thread(create_app(Recognizer.from_pretrained())) as url:
        driver = chrome(tmp_path)
        try:
            driver.get(url + "/")
            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "maps").is_enabled())
            driver.find_element(By.ID, "maps").click()
            driver.find_element(By.ID, "files").send_keys(str(scene))
            rows = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result .label"))
            by_name = {r.find_element(By.CSS_SELECTOR, ".name").text: r for r in rows}
            for name, box in OBJECTS.items():
                ActionChains(driver).move_to_element(by_name[name]).perform()
                other = next(b for n, b in OBJECTS.items() if n != name)
                own_alpha = driver.execute_script(MEAN_ALPHA, list(box))
                other_alpha = driver.execute_script(MEAN_ALPHA, list(other))
                assert own_alpha > 2 * other_alpha + 5, (name, own_alpha, other_alpha)
        finally:
            driver.quit()
